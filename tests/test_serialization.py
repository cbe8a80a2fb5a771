import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

import tldr_fast as tf
from tldr_fast import serialization
from tldr_fast.models import MLP, PaperCNN


def _model():
    torch.manual_seed(1)
    model = PaperCNN(1, 10, 28)
    # non-trivial BN statistics so buffers are part of the round trip
    model.train()
    model(torch.rand(8, 1, 28, 28))
    return model.eval()


def test_round_trip_is_bit_exact(tmp_path):
    model = _model()
    path = tf.save(
        tmp_path / "m.safetensors", model, metadata={"dataset": "mnist", "test_accuracy": 0.97}
    )
    loaded = tf.load(path)
    assert type(loaded) is PaperCNN and loaded.config() == model.config()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert loaded.metadata == {"dataset": "mnist", "test_accuracy": 0.97}


def test_mlp_round_trip(tmp_path):
    model = MLP(3, 4, (5, 6), hidden=(8, 4)).eval()
    loaded = tf.load(tf.save(tmp_path / "mlp.safetensors", model))
    assert loaded.config() == model.config()


def test_truncated_file_is_refused(tmp_path):
    path = tf.save(tmp_path / "m.safetensors", _model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tf.load(path)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tf.load(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no tldr-fast header"):
        tf.load(path)


def test_unknown_architecture_is_named(tmp_path):
    path = serialization.write_safetensors_atomic(
        tmp_path / "m.safetensors",
        {"w": torch.zeros(1)},
        {"format": "tldr-fast/model", "arch": "ResNet999", "config": {}},
    )
    with pytest.raises(ValueError, match="unknown architecture 'ResNet999'.*PaperCNN"):
        tf.load(path)


def test_pt_files_only_through_weights_only(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(_model().state_dict(), path)
    with pytest.raises(ValueError, match="weights_only=True"):
        tf.load(path)
    state = serialization.load_state_dict_file(path)
    assert set(state) == set(_model().state_dict())

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"w": Payload()}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        serialization.load_state_dict_file(path)


def _slow_writer(path, started):
    def write(tmp):
        tmp.write_bytes(b"partial")
        started.set()
        time.sleep(30)

    serialization.atomic_write(path, write)


def test_killed_save_leaves_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    tf.save(path, _model())
    before = path.read_bytes()
    started = mp.get_context("fork").Event()
    proc = mp.get_context("fork").Process(target=_slow_writer, args=(path, started))
    proc.start()
    assert started.wait(20)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert path.read_bytes() == before
    assert tf.load(path) is not None


def test_json_header_holds_architecture(tmp_path):
    path = tf.save(tmp_path / "m.safetensors", _model(), metadata={"dataset": "mnist-bundled"})
    header = serialization.load_header(path)
    assert header["arch"] == "PaperCNN" and header["config"]["in_channels"] == 1
    json.dumps(header)


def test_save_refuses_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="nn.Module or a Result"):
        tf.save(tmp_path / "x.safetensors", object())
    with pytest.raises(TypeError, match="arch"):
        tf.save(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))


def test_attack_architectures_load_in_a_fresh_process(tmp_path):
    """Model files of the attacks' classifiers load without the caller importing their modules."""
    import subprocess
    import sys

    from tldr_fast.attacks.dp import PaperCNNGroupNorm

    path = tf.save(tmp_path / "dp.safetensors", PaperCNNGroupNorm(1, 10, 28).eval())
    code = f"import tldr_fast as tf; print(type(tf.load({str(path)!r})).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "PaperCNNGroupNorm"


def test_saved_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tf.save(tmp_path / "m.safetensors", _model())
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_every_registered_architecture_reads_back_through_the_header_check(tmp_path):
    """The reader builds each architecture on the meta device to check the file's tensors first."""
    from tldr_fast.attacks.bnn_model import BinarizedMLP
    from tldr_fast.attacks.dp import PaperCNNGroupNorm
    from tldr_fast.attacks.kkt import KKTMLP
    from tldr_fast.attacks.split import MnistSplitNet, OmniglotSplitNet
    from tldr_fast.models import LeNet, ResNet18, ViT

    built = {
        cls.arch: cls()
        for cls in (
            BinarizedMLP,
            PaperCNNGroupNorm,
            MnistSplitNet,
            OmniglotSplitNet,
            LeNet,
            MLP,
            PaperCNN,
            ViT,
        )
    }
    # Non-default sizes are part of the architecture's config, checked like the defaults.
    built["ResNet18"] = ResNet18(width=4)
    built["KKTMLP"] = KKTMLP(hidden=(16, 8))
    assert set(built) == set(serialization.architectures())
    for arch, model in built.items():
        loaded = tf.load(tf.save(tmp_path / f"{arch}.safetensors", model.eval()))
        assert type(loaded) is type(model)
        for (k, a), (k2, b) in zip(
            model.state_dict().items(), loaded.state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(a, b)


def test_header_is_checked_before_any_tensor_is_read(tmp_path):
    path = tf.save(tmp_path / "m.safetensors", _model())
    infos, header = serialization.read_header(path)
    assert infos["classifier.weight"] == serialization.TensorInfo(torch.float32, (10, 256))
    assert header["arch"] == "PaperCNN"
    data = path.read_bytes()
    # A length prefix pointing past the end of the file.
    path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match="header length .* in a file of"):
        serialization.read_header(path)


def test_model_config_that_does_not_build_is_named(tmp_path):
    model = _model()
    header = {
        "format": serialization.MODEL_FORMAT,
        "arch": "PaperCNN",
        "config": {**model.config(), "channels": "x"},
    }
    path = serialization.write_safetensors_atomic(
        tmp_path / "m.safetensors", model.state_dict(), header
    )
    with pytest.raises(ValueError, match="does not build PaperCNN"):
        tf.load(path)
    header["config"] = {"hidden": list(range(5000))}
    path = serialization.write_safetensors_atomic(
        tmp_path / "m.safetensors", model.state_dict(), header
    )
    with pytest.raises(ValueError, match="at most 4096 characters"):
        tf.load(path)
