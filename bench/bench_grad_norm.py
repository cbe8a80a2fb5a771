"""pytest-benchmark over the gradnorm suite's steps on a tiny batch (a smoke test of bench/grad_norm.py)."""

from __future__ import annotations

import pytest
import torch

from bench import grad_norm as suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model():
    return suite.frozen_paper_cnn(DEVICE)


def test_baseline(benchmark, model):
    x, y = suite.batch_for(model, 8, DEVICE)
    (dx,) = benchmark(suite.baseline_step(model, x, y))
    assert dx.shape == x.shape and torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", suite.BACKENDS)
def test_grad_norm_value_and_input_gradient(benchmark, model, backend):
    x, y = suite.batch_for(model, 8, DEVICE)
    (dx,) = benchmark(suite.grad_norm_step(model, x, y, backend))
    assert dx.shape == x.shape and torch.isfinite(dx).all()
