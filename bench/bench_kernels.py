"""pytest-benchmark over the kernels suite's functions on tiny shapes (a smoke test of bench/kernels.py).

Triton runs in the interpreter on CPU, so its timings here only show that the path works.
"""

from __future__ import annotations

import pytest
import torch

from bench import kernels as suite
from tldr_fast import losses

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant", ["naive", "identity", "triton"])
def test_diversity_fwd_bwd(benchmark, variant):
    fn = {
        "naive": suite.naive_diversity,
        "identity": suite.identity_diversity,
        "triton": suite.triton_diversity,
    }[variant]
    feat = torch.randn(96, 32, device=DEVICE).abs() + 0.1
    (g,) = benchmark(suite._fwd_bwd(fn, feat))
    assert torch.isfinite(g).all()


def test_naive_matches_identity():
    feat = torch.randn(96, 32, dtype=torch.float64)
    for normalized in (True, False):
        naive = suite.naive_diversity(feat, normalized)
        torch.testing.assert_close(
            torch.stack(naive).double(),
            torch.stack(suite.losses.diversity_losses(feat, normalized)).double(),
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.mark.parametrize("variant", ["torch", "triton", "fused"])
def test_tv_pixel(benchmark, variant):
    x = torch.rand(8, 1, 28, 28, device=DEVICE) * 1.4 - 0.2
    if variant == "fused":
        loss, _, _ = benchmark(suite._tv_fused(x))
    else:
        tv, pix = benchmark(suite._fwd(lambda t: losses.tv_pixel(t, impl=variant), x))
        loss = tv + pix
    assert torch.isfinite(loss)
