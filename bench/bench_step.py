"""pytest-benchmark: one reconstruction step (naive reference and fast eager) and the gate's
component pairs, on tiny shapes; `python -m bench step` and `python -m bench.gate` time the same
functions at full size."""

from __future__ import annotations

import pytest
import torch

from bench.gate import _with_input_grad
from bench.naive_step import naive_diversity, naive_grad_norms
from bench.step import bench_classifier, make_runner
from tldr_fast import losses
from tldr_fast.grad_norm import per_sample_grad_norm


@pytest.fixture(scope="module")
def classifier():
    return bench_classifier("cpu")


@pytest.mark.parametrize(
    ("variant", "chunk"),
    [("naive", None), ("fast-eager", None), ("fast-eager", 3)],
    ids=["naive", "fast-eager", "fast-eager-chunks-of-3"],
)
def test_step(benchmark, classifier, variant, chunk):
    runner = make_runner(variant, 8, classifier, "cpu", chunk)
    benchmark.pedantic(runner, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["ghost", "naive"])
def test_grad_norm_term_with_input_gradient(benchmark, classifier, backend):
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    if backend == "ghost":
        run = _with_input_grad(
            lambda xi: per_sample_grad_norm(classifier, xi, y, backend="ghost").mean(), x
        )
    else:
        run = _with_input_grad(lambda xi: naive_grad_norms(classifier, xi, y).mean(), x)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("route", ["identity", "gram"])
def test_diversity_with_gradient(benchmark, route):
    feat = torch.randn(512, 256)
    loss = (
        (lambda f: sum(losses.diversity_losses(f, impl="torch")))
        if route == "identity"
        else (lambda f: sum(naive_diversity(f)))
    )
    benchmark.pedantic(_with_input_grad(loss, feat), rounds=3, warmup_rounds=1)


def test_kernels_variant_is_cuda_only(classifier):
    with pytest.raises(
        ValueError, match="fast-compiled-kernels variant runs on CUDA only, got device cpu"
    ):
        make_runner("fast-compiled-kernels", 8, classifier, "cpu")
