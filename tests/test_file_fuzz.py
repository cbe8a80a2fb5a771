"""Fuzzing the readers of model files, checkpoints and run directories with hostile files.

Each example damages one genuine file: truncation, overwritten bytes, or a header entry (a tensor's
dtype, shape or byte range, or a field of the tldr-fast metadata) replaced by a hostile JSON value
(null, lists, huge integers, strings...). Whatever the damage, the reader returns or raises
ValueError / OSError with a message naming the file: never another exception, and never a memory
high-water mark beyond a small multiple of the file sizes. The CI sweep is small; the `slow`
sweep, the same property with TLDR_FAST_FUZZ_EXAMPLES examples, runs only when that is set.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tldr_fast as tf
from tldr_fast import engine, serialization
from tldr_fast.config import ReconstructionConfig
from tldr_fast.models import PaperCNN
from tldr_fast.objective import build_generators

SHAPE = (1, 14, 14)
CONFIG = ReconstructionConfig(
    latent_dim=8,
    generator_width=4,
    batch_size=10,
    num_generators=2,
    steps=2,
    checkpoint_every=1,
    log_every=1,
)
CI = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SWEEP_EXAMPLES = int(os.environ.get("TLDR_FAST_FUZZ_EXAMPLES", "0"))
SWEEP = settings(
    max_examples=max(SWEEP_EXAMPLES, 1), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

HOSTILE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([2**31 - 1, 10**5, -1, 0]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.sampled_from(
            [
                "F32",
                "I32",
                "F64",
                "U8",
                "BOOL",
                "F8_E4M3",
                "tldr-fast/model",
                "tldr-fast/checkpoint",
            ]
        ),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def _classifier() -> PaperCNN:
    torch.manual_seed(0)
    return PaperCNN(1, 10, 14, channels=(4, 8), hidden=16).eval()


@functools.cache
def _originals() -> Path:
    """A model file and a finished run directory with checkpoints, made once per process."""
    root = Path(tempfile.mkdtemp(prefix="tldr-fuzz-"))
    tf.save(root / "model.safetensors", _classifier())
    tf.reconstruct(
        _classifier(), 10, SHAPE, CONFIG, run_dir=root / "run", progress=False, samples_per_class=1
    )
    return root


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@st.composite
def damaged(draw, data: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "bytes", "tensor", "metadata"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "bytes":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            # Mostly the 8-byte length and the header, where a parser can go wrong.
            out[draw(st.integers(0, min(len(data) - 1, 4096)))] = draw(st.integers(0, 255))
        return bytes(out)
    header, body = _split(data)
    if how == "tensor":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(HOSTILE)
        return _join(header, body)
    meta = json.loads(header["__metadata__"]["tldr_fast"])
    target = meta
    if isinstance(meta.get("config"), dict) and draw(st.booleans()):
        target = meta["config"]
    key = draw(st.one_of(st.sampled_from(sorted(target)), st.text(max_size=4)))
    target[key] = draw(HOSTILE)
    header["__metadata__"]["tldr_fast"] = json.dumps(meta)
    return _join(header, body)


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _expect_clean_failure(read) -> None:
    try:
        read()
    except (ValueError, OSError):
        pass


def _bounded(read, budget_kib: int):
    before = _peak_kib()
    _expect_clean_failure(read)
    grown = _peak_kib() - before
    assert grown <= budget_kib, f"the reader's memory high-water mark grew by {grown} KiB"


# A tiny file may still cost a module's ordinary working memory; 64 MiB bounds that many times over.
BUDGET_KIB = 64 * 1024


def _model_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(data)
        _bounded(lambda: tf.load(path), BUDGET_KIB)
        _bounded(lambda: serialization.load_state_dict_file(path), BUDGET_KIB)


@functools.cache
def _layout():
    classifier = _classifier()
    template, params, buffers = build_generators(CONFIG, 10, SHAPE, torch.device("cpu"))
    return template, params, buffers, engine.classifier_fingerprint(classifier)


def _checkpoint_reader(data: bytes) -> None:
    template, params, buffers, fingerprint = _layout()
    trained = engine.Trained(template, dict(params), dict(buffers), CONFIG)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "step-00000002.safetensors"
        path.write_bytes(data)
        rng = torch.get_rng_state()
        try:
            _bounded(lambda: engine.load_checkpoint(path, trained, fingerprint), BUDGET_KIB)
        finally:
            torch.set_rng_state(rng)


def _run_reader(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        shutil.copytree(_originals() / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
        (run / name).write_bytes(data)
        _bounded(lambda: tf.load(run), BUDGET_KIB)


def _file(*parts: str) -> bytes:
    return _originals().joinpath(*parts).read_bytes()


def test_the_originals_read_back():
    assert isinstance(tf.load(_originals() / "model.safetensors"), PaperCNN)
    assert len(tf.load(_originals() / "run").generators) == 2
    template, params, buffers, fingerprint = _layout()
    trained = engine.Trained(template, dict(params), dict(buffers), CONFIG)
    engine.load_checkpoint(
        _originals() / "run/checkpoints/step-00000002.safetensors", trained, fingerprint
    )
    assert trained.steps_done == 2


@CI
@given(st.data())
def test_model_reader(data):
    _model_reader(data.draw(damaged(_file("model.safetensors"))))


@CI
@given(st.data())
def test_checkpoint_reader(data):
    _checkpoint_reader(data.draw(damaged(_file("run", "checkpoints", "step-00000002.safetensors"))))


@CI
@given(st.data(), st.sampled_from(["images.safetensors", "generators.safetensors"]))
def test_run_reader_tensor_files(data, name):
    _run_reader(name, data.draw(damaged(_file("run", name))))


@CI
@given(st.sampled_from(["config.json", "history.json"]), st.data())
def test_run_reader_json_files(name, data):
    original = json.loads(_file("run", name))
    key = data.draw(st.one_of(st.sampled_from(sorted(original)), st.text(max_size=4)))
    mutated = json.dumps({**original, key: data.draw(HOSTILE)}).encode()
    _run_reader(name, mutated[: data.draw(st.integers(0, len(mutated)))])


@pytest.mark.parametrize("value", [2**31 - 1, 10**5, 2**62])
def test_huge_sizes_in_every_reader(value):
    """The named edge case: a huge num_classes / image_size / count asks for far more than the file holds."""
    meta_edit = {"num_classes": value, "image_size": value}
    header, body = _split(_file("model.safetensors"))
    meta = json.loads(header["__metadata__"]["tldr_fast"])
    for key, v in meta_edit.items():
        header["__metadata__"]["tldr_fast"] = json.dumps(
            {**meta, "config": {**meta["config"], key: v}}
        )
        _model_reader(_join(header, body))
    header, body = _split(_file("run", "generators.safetensors"))
    meta = json.loads(header["__metadata__"]["tldr_fast"])
    header["__metadata__"]["tldr_fast"] = json.dumps({**meta, "num_generators": value})
    _run_reader("generators.safetensors", _join(header, body))
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [value, value]
    _run_reader("generators.safetensors", _join(header, body))


@pytest.mark.slow
@pytest.mark.skipif(
    SWEEP_EXAMPLES == 0, reason="set TLDR_FAST_FUZZ_EXAMPLES (e.g. 1000) for the long sweep"
)
@SWEEP
@given(
    st.data(),
    st.sampled_from(["model", "checkpoint", "images.safetensors", "generators.safetensors"]),
)
def test_all_readers_sweep(data, reader):
    if reader == "model":
        _model_reader(data.draw(damaged(_file("model.safetensors"))))
    elif reader == "checkpoint":
        _checkpoint_reader(
            data.draw(damaged(_file("run", "checkpoints", "step-00000002.safetensors")))
        )
    else:
        _run_reader(reader, data.draw(damaged(_file("run", reader))))
