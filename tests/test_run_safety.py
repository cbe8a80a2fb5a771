"""Runs that cannot lose work: one owner per run directory, output paths checked before any work,
atomic files without leftovers, resume past damaged checkpoints, one-line errors.

Through the CLI (in-process `main`, and subprocesses where a process must die or compete) and the
API. The runs are tiny (a 14 x 14 PaperCNN, 2 generators of width 4, a few steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tldr_fast as tf
from tldr_fast import atomic_files, engine, run_dir, serialization
from tldr_fast.cli import main
from tldr_fast.config import ReconstructionConfig
from tldr_fast.models import PaperCNN

TINY = [
    "--batch-size",
    "10",
    "--generators",
    "2",
    "--samples-per-class",
    "1",
    "--no-progress",
    "--set",
    "latent_dim=8",
    "--set",
    "generator_width=4",
]
TINY_CONFIG = {
    "latent_dim": 8,
    "generator_width": 4,
    "batch_size": 10,
    "num_generators": 2,
    "log_every": 1,
}
SHAPE = (1, 14, 14)


def _classifier(seed: int = 0) -> PaperCNN:
    torch.manual_seed(seed)
    return PaperCNN(1, 10, 14, channels=(4, 8), hidden=16).eval()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tf.save(path, _classifier(), metadata={"dataset": "mnist-bundled"})
    return path


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    return subprocess.run(
        [sys.executable, "-m", "tldr_fast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _popen(*args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tldr_fast", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(condition, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the process ended early ({proc.returncode}): {proc.stderr.read()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"tldr-fast {command}: error: "), stderr
    return lines[0]


# -- 2, 3, 5: kill -9, a second writer, stale temporaries, resume past a truncated checkpoint ---------


def test_kill_9_then_second_writer_refused_stale_temps_removed_and_resume_falls_back(
    model_file, tmp_path
):
    out = tmp_path / "run"
    args = ["reconstruct", "--model", str(model_file), "--out", str(out), *TINY]
    first = _popen(*args, "--steps", "100000", "--checkpoint-every", "1")
    try:
        _wait_for(lambda: len(run_dir.list_checkpoints(out)) >= 2, 240, first)
        # 3: a second writer exits 2 at once, naming the directory and the holder's pid.
        second = _cli(*args, "--steps", "3", "--resume")
        assert second.returncode == 2
        line = _one_error_line(second.stderr, "reconstruct")
        assert str(out) in line and f"process {first.pid}" in line
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()

    kept = run_dir.list_checkpoints(out)
    assert len(kept) == engine.CHECKPOINTS_KEPT  # rotation kept this run's newest two
    # 5: a partial file of the writer, as a kill during a write leaves it; and a truncated newest checkpoint.
    stale = out / "checkpoints" / f"{atomic_files.TEMP_PREFIX}step-99999999.safetensors.abc123"
    stale.write_bytes(b"partial")
    newest, previous = kept[-1], kept[-2]
    newest.write_bytes(newest.read_bytes()[:1000])

    done = run_dir.checkpoint_step(previous) + 1
    resumed = _cli(*args, "--steps", str(done), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"warning: resuming from {previous}" in resumed.stderr
        and f"skipped: {newest}" in resumed.stderr
    )
    assert not stale.exists()
    assert not [p for p in out.rglob(f"{atomic_files.TEMP_PREFIX}*")]
    assert json.loads((out / "history.json").read_text())["steps"] == done


def test_second_writer_in_process_names_the_holder(model_file, tmp_path):
    out = tmp_path / "run"
    holder = _popen(
        "reconstruct",
        "--model",
        str(model_file),
        "--out",
        str(out),
        *TINY,
        "--steps",
        "100000",
        "--checkpoint-every",
        "0",
    )
    try:
        _wait_for(
            lambda: (
                (out / run_dir.LOCK_NAME).is_file()
                and (out / run_dir.LOCK_NAME).read_text().strip()
            ),
            240,
            holder,
        )
        with pytest.raises(run_dir.RunDirectoryError, match=f"in use by process {holder.pid}"):
            with run_dir.claim(out, "resume"):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with run_dir.claim(out, "resume"):  # the OS released the dead holder's lock
        pass


# -- 2: a fresh run into a reused directory ------------------------------------------------------


def test_fresh_run_into_a_non_empty_directory_refuses_naming_resume_and_overwrite(
    model_file, tmp_path, capsys
):
    out = tmp_path / "run"
    args = [
        "reconstruct",
        "--model",
        str(model_file),
        "--out",
        str(out),
        *TINY,
        "--checkpoint-every",
        "1",
    ]
    assert main([*args, "--steps", "3", "--keep-checkpoints"]) == 0
    before = {p.name: p.read_bytes() for p in run_dir.list_checkpoints(out)}
    capsys.readouterr()
    assert main([*args, "--steps", "2"]) == 2
    line = _one_error_line(capsys.readouterr().err, "reconstruct")
    assert "is not empty" in line and "--resume" in line and "--overwrite" in line
    assert {
        p.name: p.read_bytes() for p in run_dir.list_checkpoints(out)
    } == before  # nothing touched

    assert main([*args, "--steps", "2", "--overwrite", "--keep-checkpoints"]) == 0
    assert [p.name for p in run_dir.list_checkpoints(out)] == [
        "step-00000001.safetensors",
        "step-00000002.safetensors",
    ]
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 2
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_api_fresh_run_into_a_used_directory_is_refused(tmp_path):
    cfg = ReconstructionConfig(**TINY_CONFIG, steps=1, checkpoint_every=1)
    classifier = _classifier()
    tf.reconstruct(
        classifier, 10, SHAPE, cfg, run_dir=tmp_path / "r", progress=False, samples_per_class=1
    )
    with pytest.raises(run_dir.RunDirectoryError, match="resume=True or overwrite=True"):
        engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path / "r", progress=False)


def _fake_checkpoint(folder: Path, step: int, run_id: str | None) -> Path:
    meta = {"format": run_dir.CHECKPOINT_FORMAT} | (
        {"run_id": run_id} if run_id is not None else {}
    )
    return serialization.write_safetensors_atomic(
        folder / f"step-{step:08d}.safetensors", {"x": torch.zeros(1)}, meta
    )


def test_rotation_touches_only_older_checkpoints_of_the_same_run(tmp_path):
    folder = run_dir.checkpoint_dir(tmp_path)
    for step in (1, 2, 3):
        _fake_checkpoint(folder, step, "mine")
    foreign = [
        _fake_checkpoint(folder, 0, "other"),
        _fake_checkpoint(folder, 50, "other"),
        _fake_checkpoint(folder, 60, None),
    ]
    newest = _fake_checkpoint(folder, 4, "mine")
    deleted = run_dir.rotate_checkpoints(newest, "mine", 2)
    assert sorted(p.name for p in deleted) == [
        "step-00000001.safetensors",
        "step-00000002.safetensors",
    ]
    names = {p.name for p in run_dir.list_checkpoints(tmp_path)}
    assert names == {
        "step-00000003.safetensors",
        "step-00000004.safetensors",
        *(p.name for p in foreign),
    }
    # keep=1 keeps the newest, never deletes it.
    run_dir.rotate_checkpoints(newest, "mine", 1)
    assert newest.exists() and not (folder / "step-00000003.safetensors").exists()


# -- 4: output paths checked before any work -------------------------------------------------------


def test_train_out_a_directory_fails_before_loading_data(tmp_path, capsys, monkeypatch):
    def no_work(*_, **__):
        raise AssertionError("the dataset was loaded before the output path was checked")

    monkeypatch.setattr(tf.datasets, "load_dataset", no_work)
    assert main(["train", "--out", str(tmp_path), "--epochs", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"--out {tmp_path} is a directory" in line


@pytest.mark.parametrize("command", ["reconstruct", "invert", "demo"])
def test_run_out_a_file_or_under_a_file_fails_before_any_work(
    model_file, tmp_path, capsys, command
):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    model = [] if command == "demo" else ["--model", str(model_file)]
    for out, message in (
        (a_file, "is an existing file"),
        (a_file / "sub", "cannot create the directory"),
    ):
        start = time.perf_counter()
        assert main([command, *model, "--out", str(out), "--checkpoint-every", "0"]) == 2
        assert message in _one_error_line(capsys.readouterr().err, command)
        assert time.perf_counter() - start < 5  # no training happened


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_fails_before_any_work(model_file, tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["reconstruct", "--model", str(model_file), "--out", str(locked / "run")]) == 2
        assert "cannot create the directory" in capsys.readouterr().err
        assert main(["train", "--out", str(locked / "m.safetensors")]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(
    not os.path.isdir("/sys/kernel"), reason="needs sysfs, which refuses new entries even to root"
)
def test_unwritable_outputs_fail_before_any_work_through_the_cli(model_file, capsys):
    # sysfs refuses new entries even to root: the read-only case on any box.
    assert main(["reconstruct", "--model", str(model_file), "--out", "/sys/tldr-fast-run"]) == 2
    assert "--out /sys/tldr-fast-run: cannot create the directory" in _one_error_line(
        capsys.readouterr().err, "reconstruct"
    )
    assert main(["train", "--out", "/sys/m.safetensors"]) == 2
    assert "--out /sys/m.safetensors: its directory /sys is not writable" in _one_error_line(
        capsys.readouterr().err, "train"
    )


def test_unwritable_directory_is_named():
    with pytest.raises(ValueError, match=r"--out /sys is not writable \("):
        atomic_files.check_output_dir("/sys", "--out")


def test_evaluate_needs_an_existing_run_directory(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in _one_error_line(capsys.readouterr().err, "evaluate")


# -- 5: one atomic writer --------------------------------------------------------------------------


def test_safetensors_files_are_written_through_the_one_writer(tmp_path, monkeypatch):
    written = []
    real = atomic_files.atomic_write

    def spy(path, write):
        written.append(Path(path).name)
        return real(path, write)

    monkeypatch.setattr(atomic_files, "atomic_write", spy)
    cfg = ReconstructionConfig(**TINY_CONFIG, steps=1, checkpoint_every=1)
    tf.reconstruct(
        _classifier(), 10, SHAPE, cfg, run_dir=tmp_path, progress=False, samples_per_class=1
    )
    assert {
        "step-00000001.safetensors",
        "images.safetensors",
        "generators.safetensors",
        "config.json",
        "history.json",
    } <= set(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            run_dir.LOCK_NAME,
            "checkpoints",
            "config.json",
            "generators.safetensors",
            "grid.png",
            "history.json",
            "images.safetensors",
        ]
    )


def test_failed_write_leaves_no_temporary(tmp_path):
    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_files.atomic_write(tmp_path / "x.json", fail)
    assert list(tmp_path.iterdir()) == []


# -- 5, 6: resume past damaged checkpoints --------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    tensors, meta = serialization.read_safetensors(path)
    if how == "no adam_t":
        del tensors["adam_t"]
    elif how == "no rng":
        del tensors["rng/cpu"]
    elif how == "no config":
        del meta["config"]
    elif how == "wrong shape":
        name = next(k for k in tensors if k.startswith("params/"))
        tensors[name] = torch.zeros(3, 3)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    serialization.write_safetensors_atomic(path, tensors, meta)


@pytest.mark.parametrize("how", ["no adam_t", "no rng", "no config", "wrong shape", "truncated"])
def test_resume_skips_a_damaged_newest_checkpoint_and_is_bit_exact(tmp_path, how):
    classifier = _classifier()
    cfg = ReconstructionConfig(**TINY_CONFIG, steps=3, checkpoint_every=1)
    whole = engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path / "a", progress=False)
    short = ReconstructionConfig(**TINY_CONFIG, steps=2, checkpoint_every=1)
    engine.train(classifier, 10, SHAPE, short, run_dir=tmp_path / "b", progress=False)
    newest = run_dir.list_checkpoints(tmp_path / "b")[-1]
    _damage(newest, how)
    with pytest.warns(
        run_dir.CheckpointSkipped, match=f"resuming from .*step-00000001.*skipped: {newest}"
    ):
        resumed = engine.train(
            classifier, 10, SHAPE, cfg, run_dir=tmp_path / "b", resume=True, progress=False
        )
    assert all(torch.equal(whole.params[k], resumed.params[k]) for k in whole.params)
    assert whole.history == resumed.history


def test_resume_with_no_readable_checkpoint_is_one_line(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "reconstruct",
        "--model",
        str(model_file),
        "--out",
        str(out),
        *TINY,
        "--checkpoint-every",
        "1",
    ]
    assert main([*args, "--steps", "2", "--keep-checkpoints"]) == 0
    for path in run_dir.list_checkpoints(out):
        path.write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert main([*args, "--steps", "3", "--resume"]) == 2
    line = _one_error_line(capsys.readouterr().err, "reconstruct")
    assert "no checkpoint reads back" in line and "--overwrite" in line


# -- 6, 7: hostile files and bad values: one line, exit 2 ---------------------------------------


def _model_with_header(tmp_path, **changes) -> Path:
    model = _classifier()
    header = {
        "format": serialization.MODEL_FORMAT,
        "arch": model.arch,
        "config": model.config(),
        **changes,
    }
    return serialization.write_safetensors_atomic(
        tmp_path / "m.safetensors", model.state_dict(), header
    )


def _rewrite_metadata(path: Path, raw: str) -> None:
    from safetensors.torch import save

    tensors = serialization._read_tensors(path)
    path.write_bytes(save(tensors, metadata={"tldr_fast": raw}))


@pytest.mark.parametrize(
    "raw,message",
    [
        ("null", "is NoneType, expected a JSON object"),
        ("[1, 2]", "is list, expected a JSON object"),
        ("{", "corrupt tldr-fast header"),
    ],
)
def test_model_header_not_an_object_is_one_line(tmp_path, capsys, raw, message):
    path = _model_with_header(tmp_path)
    _rewrite_metadata(path, raw)
    assert main(["reconstruct", "--model", str(path), "--out", str(tmp_path / "r")]) == 2
    assert message in _one_error_line(capsys.readouterr().err, "reconstruct")


@pytest.mark.parametrize("field,value", [("num_classes", 2147483647), ("image_size", 100000)])
def test_huge_config_is_refused_without_allocating(tmp_path, capsys, field, value):
    config = _classifier().config() | {field: value}
    path = _model_with_header(tmp_path, config=config)
    start = time.perf_counter()
    assert main(["reconstruct", "--model", str(path), "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys.readouterr().err, "reconstruct")
    assert "in the file" in line and "needs" in line
    assert time.perf_counter() - start < 10


def test_relabelled_dtype_is_refused(tmp_path):
    path = _model_with_header(tmp_path)
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "I32"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    path.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + length :]))
    with pytest.raises(ValueError, match=rf"tensor {name} is int32 .* needs float32"):
        tf.load(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_at_load_and_at_the_start_of_a_run(tmp_path, value):
    model = _classifier()
    with torch.no_grad():
        model.classifier.weight[0, 0] = value
    path = tf.save(tmp_path / "m.safetensors", model)
    with pytest.raises(ValueError, match="tensor classifier.weight holds 1 non-finite values"):
        tf.load(path)
    with pytest.raises(
        ValueError, match="classifier's tensor classifier.weight holds 1 non-finite"
    ):
        engine.train(model, 10, SHAPE, ReconstructionConfig(**TINY_CONFIG, steps=1), progress=False)


def test_non_finite_running_statistics_are_named(tmp_path):
    model = _classifier()
    bn = next(name for name, _ in model.named_buffers() if name.endswith("running_var"))
    model.get_buffer(bn)[0] = float("nan")
    with pytest.raises(ValueError, match=f"tensor {bn} holds 1 non-finite"):
        tf.load(tf.save(tmp_path / "m.safetensors", model))


def test_overflowing_weighted_term_is_named(tmp_path):
    cfg = ReconstructionConfig(**TINY_CONFIG, steps=2, alpha=3e38)
    with pytest.raises(engine.NonFiniteLossError, match="'kl' is not finite at step 1"):
        engine.train(_classifier(), 10, SHAPE, cfg, progress=False)


def test_truncated_images_in_evaluate_is_one_line(tmp_path, capsys):
    cfg = ReconstructionConfig(**TINY_CONFIG, steps=1, checkpoint_every=0)
    tf.reconstruct(
        _classifier(), 10, SHAPE, cfg, run_dir=tmp_path, progress=False, samples_per_class=1
    )
    images = tmp_path / "images.safetensors"
    images.write_bytes(images.read_bytes()[:-100])
    assert (
        main(
            ["evaluate", str(tmp_path), "--evaluator", "none", "--heldout", "none", "--no-progress"]
        )
        == 2
    )
    assert "not a readable safetensors file" in _one_error_line(capsys.readouterr().err, "evaluate")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--threshold", "-5"], "--threshold must be a number in [0, 1], got -5.0"),
        (["--threshold", "nan"], "--threshold must be a number in [0, 1], got nan"),
        (["--bootstrap", "0"], "--bootstrap must be an integer >= 1, got 0"),
    ],
)
def test_evaluate_ranges(tmp_path, capsys, extra, message):
    assert main(["evaluate", str(tmp_path), *extra]) == 2
    assert message in _one_error_line(capsys.readouterr().err, "evaluate")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--eps", "5"], "eps must lie in [0, 1]"),
        (["--set", "gamma=abc"], "--set gamma=abc: field gamma expects a number, got 'abc'"),
        (["--set", "steps=1.5"], "--set steps=1.5: field steps expects an integer, got '1.5'"),
        (
            ["--set", "classifier_chunk_size=x"],
            "field classifier_chunk_size expects an integer or none, got 'x'",
        ),
        (["--set", "ortho_normalized=maybe"], "field ortho_normalized expects true or false"),
        (["--set", "seed=-1"], "seed must be an integer >= 0"),
        (["--set", "dropout=1.5"], "dropout must be < 1"),
    ],
)
def test_engine_values_name_the_field(model_file, tmp_path, capsys, extra, message):
    assert (
        main(["reconstruct", "--model", str(model_file), "--out", str(tmp_path / "r"), *extra]) == 2
    )
    assert message in _one_error_line(capsys.readouterr().err, "reconstruct")


def test_cifar_refusal_is_a_value_error_naming_the_file(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Payload()}))
    with pytest.raises(ValueError, match=rf"{path} is not a CIFAR batch .*refusing to load global"):
        tf.datasets.read_cifar_batch(path)
    path.write_bytes(pickle.dumps({"data": [1, 2, 3]})[:-5])
    with pytest.raises(ValueError, match=f"{path} is not a (readable )?CIFAR batch"):
        tf.datasets.read_cifar_batch(path)


# -- the error path ------------------------------------------------------------------------------


def test_unexpected_error_is_one_line_with_a_way_to_the_traceback(
    model_file, tmp_path, capsys, monkeypatch
):
    def broken(*_, **__):
        raise RuntimeError("something internal\nsecond line")

    monkeypatch.setattr(tf.api, "_train_and_sample", broken)
    args = [
        "reconstruct",
        "--model",
        str(model_file),
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tldr-fast reconstruct: unexpected error: RuntimeError: something internal (rerun with --debug "
        "or TLDR_FAST_DEBUG=1 for the traceback)"
    ]
    assert main(["--debug", *args, "--overwrite"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("TLDR_FAST_DEBUG", "1")
    assert main([*args, "--overwrite"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_subprocess_error_is_one_line_and_exit_2(tmp_path):
    proc = _cli("train", "--out", str(tmp_path))
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "train")


# -- a finished run drops its checkpoints unless asked to keep them --------------------------------


def test_a_finished_run_drops_its_checkpoints_unless_kept_and_says_why_it_cannot_resume(
    model_file, tmp_path, capsys
):
    args = ["reconstruct", "--model", str(model_file), *TINY, "--checkpoint-every", "1"]
    dropped, kept = tmp_path / "dropped", tmp_path / "kept"
    assert main([*args, "--out", str(dropped)]) == 0
    assert run_dir.list_checkpoints(dropped) == []
    assert (dropped / "images.safetensors").is_file() and (
        dropped / "generators.safetensors"
    ).is_file()
    assert main([*args, "--out", str(kept), "--keep-checkpoints"]) == 0
    assert len(run_dir.list_checkpoints(kept)) == engine.CHECKPOINTS_KEPT
    capsys.readouterr()
    assert main([*args, "--out", str(dropped), "--steps", "3", "--resume"]) == 2
    line = _one_error_line(capsys.readouterr().err, "reconstruct")
    assert (
        "checkpoints were dropped" in line
        and "--keep-checkpoints" in line
        and "--overwrite" in line
    )
