"""pytest-benchmark: the matching benchmark's functions on tiny shapes (`python -m bench evaluate` for the real size)."""

from __future__ import annotations

import pytest
import torch

from tldr_fast.evaluate import authors_statistics, class_ssim_matrices
from tldr_fast.ssim import ssim_matrix


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    recon = torch.rand(10, 1, 28, 28, generator=gen)
    train = torch.rand(60, 1, 28, 28, generator=gen)
    return recon, torch.arange(10) % 10, train, torch.arange(60) % 10


def test_ssim_matrix(benchmark, images):
    recon, _, train, _ = images
    out = benchmark(ssim_matrix, recon, train, impl="eager")
    assert out.shape == (10, 60)


def test_class_matrices_and_hungarian(benchmark, images):
    def run():
        return authors_statistics(class_ssim_matrices(*images))

    assert benchmark(run)["percent_reconstructed"] == 0.0  # noise does not match noise
