"""Test-wide settings: Triton runs in its interpreter without a GPU; CUDA and shared-data tests skip cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Must be set before any @triton.jit kernel is defined, so that explicit impl="triton" calls on CPU
# tensors run the real kernels in the interpreter. impl="auto" still picks torch on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the full datasets beside the checkout (../shared/data); skips when absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"full datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
