import gzip
import http.server
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tldr_fast import datasets


def test_bundled_splits_are_real_balanced_and_disjoint():
    x, y = datasets.load("mnist-bundled")
    xt, yt = datasets.load("mnist-bundled", split="test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(yt).tolist() == [100] * 10
    # no test digit appears in the training split
    train_keys = {row.numpy().tobytes() for row in x.flatten(1)}
    assert not any(row.numpy().tobytes() in train_keys for row in xt.flatten(1))


def test_balanced_subset_is_seeded_and_per_class():
    a = datasets.load("mnist-bundled", subset=1000, seed=3)
    b = datasets.load("mnist-bundled", subset=1000, seed=3)
    c = datasets.load("mnist-bundled", subset=1000, seed=4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.bincount(a[1]).tolist() == [100] * 10


@pytest.mark.data
def test_full_mnist_matches_published_counts(shared_data):
    x, y = datasets.load("mnist", root=shared_data)
    xt, yt = datasets.load("mnist", split="test", root=shared_data)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert int(y[0]) == 5
    assert torch.bincount(y).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert torch.bincount(yt).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.data
def test_omniglot_small_sets(shared_data):
    ds = datasets.load_dataset("omniglot", split="background_small1", root=shared_data)
    assert ds.images.shape[1:] == (1, 105, 105)
    assert ds.num_classes == len(set(ds.labels.tolist()))
    assert all("/" in name for name in ds.class_names)
    assert torch.bincount(ds.labels).min() == 20  # 20 drawers per character


def test_unknown_name_lists_valid_ones():
    with pytest.raises(
        ValueError, match="unknown dataset name 'mnist2'.*fashion-mnist.*mnist-bundled"
    ):
        datasets.load("mnist2")


def test_unknown_split():
    with pytest.raises(ValueError, match="no split 'val'"):
        datasets.load("mnist-bundled", split="val")


def test_missing_files_name_every_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        datasets.load("mnist", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "train-labels-idx1-ubyte.gz" in msg and "download=True" in msg


@pytest.mark.parametrize(
    "subset,match",
    [(1001, "not divisible"), (5, ">= the number of classes"), (5000, "has only 400")],
)
def test_bad_subsets(subset, match):
    with pytest.raises(ValueError, match=match):
        datasets.load("mnist-bundled", subset=subset)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_roundtrip_and_truncation(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28))
    labels = np.arange(20) % 10
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = datasets.load("mnist", split="test", root=tmp_path)
    assert torch.equal((x[:, 0] * 255).round().to(torch.int64), torch.from_numpy(imgs))
    assert y.tolist() == labels.tolist()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        data = fh.read()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        datasets.load("mnist", split="test", root=tmp_path)


def test_cifar_reader_refuses_foreign_globals(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
            b"labels": [0, 1, 2, 3],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    x, y = datasets.load("cifar10", root=tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.tolist()[:4] == [0, 1, 2, 3]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        datasets.load("cifar10", split="test", root=tmp_path)


def test_download_verifies_checksum(tmp_path, monkeypatch):
    served = tmp_path / "mirror"
    served.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (served / name).write_bytes(b"not the published file")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TLDR_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}/")
        with pytest.raises(datasets.ChecksumError, match="checksum mismatch"):
            datasets.load("mnist", split="test", root=tmp_path / "root", download=True)
    finally:
        server.shutdown()
    # nothing half-downloaded is left where a later load would pick it up
    assert not list((tmp_path / "root").rglob("*-ubyte*"))
