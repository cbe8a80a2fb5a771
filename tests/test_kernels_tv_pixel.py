"""Triton TV + pixel-range kernel (tldr_fast.kernels.tv_pixel) against a float64 loop oracle.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so images stay
small; the `cuda` tests repeat the checks at large shapes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

# Helpers shared by the two kernels test files.
from test_kernels_diversity import _poisoned, assert_compiles
from torch.func import grad, vmap

from tldr_fast import losses
from tldr_fast.kernels import runtime
from tldr_fast.kernels import tv_pixel as ktv

pytestmark = pytest.mark.triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Loss weights as a caller would set them (no fp32-subnormal weights: those underflow to zero).
WEIGHTS = st.one_of(st.just(0.0), st.floats(1e-3, 2.0), st.floats(-2.0, -1e-3))


def oracle(x: torch.Tensor, w_tv: float, w_pix: float):
    """float64 TV and Pix from zero-padded neighbour differences, and dL/dx by autograd."""
    x = x.detach().double().requires_grad_()
    n = x.shape[0]
    # Pad one zero row / column, then zero the difference that would cross the image border.
    down = torch.nn.functional.pad(x, (0, 0, 0, 1))[:, :, 1:, :] - x
    right = torch.nn.functional.pad(x, (0, 1))[:, :, :, 1:] - x
    down[:, :, -1, :] = 0
    right[:, :, :, -1] = 0
    tv = (down.square() + right.square()).sum() / n
    pix = (torch.relu(-x) + torch.relu(x - 1)).sum() / n  # relu: zero slope at exactly 0 and 1
    (g,) = torch.autograd.grad(w_tv * tv + w_pix * pix, x)
    return tv.detach(), pix.detach(), g


def rms(t: torch.Tensor) -> float:
    return t.double().square().mean().sqrt().item()


def images(shape, dtype=torch.float32, low=-0.3, high=1.3):
    return (low + (high - low) * torch.rand(shape, dtype=torch.float64)).to(dtype)


def check_against_oracle(x, w_tv=0.7, w_pix=1.3):
    tol = TOL[x.dtype]
    xr = x.detach().clone().requires_grad_()
    tv, pix = losses.tv_pixel(xr, impl="triton")
    assert tv.dtype == pix.dtype == torch.float32
    (g,) = torch.autograd.grad(w_tv * tv + w_pix * pix, xr)
    assert g.dtype == x.dtype and g.shape == x.shape
    ref_tv, ref_pix, ref_g = oracle(x, w_tv, w_pix)
    assert abs(tv.double() - ref_tv) <= tol * abs(ref_tv) + 1e-12, (tv, ref_tv)
    assert abs(pix.double() - ref_pix) <= tol * abs(ref_pix) + 1e-12, (pix, ref_pix)
    # bf16 gradients are rounded to bf16 on output: relative RMS against the float64 gradient.
    assert rms(g.double() - ref_g) <= tol * rms(ref_g) + 1e-12
    loss, wtv, wpix = losses.weighted_tv_pixel(xr, w_tv, w_pix, impl="triton")
    (g2,) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(wtv, tv)
    torch.testing.assert_close(wpix, pix)
    torch.testing.assert_close(g2, g)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 1),
        (2, 1, 1, 9),
        (2, 3, 7, 1),
        (3, 1, 5, 7),
        (2, 3, 28, 28),
        (4, 1, 29, 31),
        (1, 3, 33, 65),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle(shape, dtype):
    check_against_oracle(images(shape, dtype))


def test_plane_spanning_several_tiles():
    # 131 x 127 > the interpreter's 2^14-element tile: per-plane sums are split across programs.
    check_against_oracle(images((2, 1, 131, 127)))


# No shrink phase: each example runs interpreted kernels, so shrinking would take minutes.
@settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    n=st.integers(1, 5),
    c=st.sampled_from([1, 3]),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    low=st.sampled_from([-2.0, -0.1, 0.0, 0.5]),
    width=st.sampled_from([0.5, 1.0, 3.0]),
    w_tv=WEIGHTS,
    w_pix=WEIGHTS,
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(n, c, h, w, dtype, low, width, w_tv, w_pix, seed):
    torch.manual_seed(seed)
    check_against_oracle(images((n, c, h, w), dtype, low, low + width), w_tv, w_pix)


def test_non_contiguous_input():
    check_against_oracle(images((3, 9, 11, 2)).permute(0, 3, 1, 2))


def test_every_output_element_written(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    for shape in [(3, 3, 29, 31), (1, 1, 131, 127)]:
        x = images(shape).requires_grad_()
        tv, pix = losses.tv_pixel(x, impl="triton")
        (g,) = torch.autograd.grad(tv + pix, x)
        loss, _, _ = losses.weighted_tv_pixel(x, 0.5, 2.0, impl="triton")
        (g2,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(tv) and torch.isfinite(pix)
        assert torch.isfinite(g).all() and torch.isfinite(g2).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    x = images((2, 3, 8, 9))
    x[1, 2, 3, 4] = bad
    tv, pix = losses.tv_pixel(x, impl="triton")
    assert torch.isnan(tv) or torch.isinf(tv)
    if bad != bad:  # NaN shows in both losses, as relu(NaN) = NaN in the reference
        assert torch.isnan(tv) and torch.isnan(pix)


def _loss(x, impl):
    tv, pix = losses.tv_pixel(x, impl=impl)
    return 0.3 * tv + 0.7 * pix


def test_vmap_over_generators_folds_into_one_batch():
    xs = images((3, 2, 1, 9, 11))
    ref = torch.stack([_loss(x, "torch") for x in xs])
    torch.testing.assert_close(vmap(lambda x: _loss(x, "triton"))(xs), ref)
    ref_g = torch.stack([grad(lambda x: _loss(x, "torch"))(x) for x in xs])
    torch.testing.assert_close(vmap(grad(lambda x: _loss(x, "triton")))(xs), ref_g)
    outer = grad(lambda a: vmap(lambda x: _loss(x, "triton"))(a).sum())(xs)
    torch.testing.assert_close(outer, ref_g)
    nested = vmap(vmap(lambda x: _loss(x, "triton")))(xs.expand(2, *xs.shape))
    torch.testing.assert_close(nested, ref.expand(2, 3))
    weighted = vmap(grad(lambda x: losses.weighted_tv_pixel(x, 0.3, 0.7, impl="triton")[0]))(xs)
    torch.testing.assert_close(weighted, ref_g)
    moved = vmap(lambda x: _loss(x, "triton"), in_dims=1)(xs.movedim(0, 1))
    torch.testing.assert_close(moved, ref)


def test_auto_uses_torch_on_cpu_and_torch_impl_is_the_reference():
    from tldr_fast.losses import tv_pixel as reference

    x = images((2, 1, 5, 6))
    assert losses.resolve_impl("auto", x, "tv_pixel") == "torch"
    for impl in ("auto", "torch"):
        torch.testing.assert_close(losses.tv_pixel(x, impl=impl), reference(x, impl="torch"))
    loss, tv, pix = losses.weighted_tv_pixel(x, 2.0, 3.0, impl="torch")
    torch.testing.assert_close(loss, 2.0 * tv + 3.0 * pix)


def test_stacked_batches_are_one_launch_equal_to_each_alone():
    xs = images((3, 2, 3, 5, 6))
    tv, pix = losses.stacked_tv_pixel(xs, impl="triton")
    torch.testing.assert_close((tv, pix), ktv.tv_pixel(xs), rtol=0, atol=0)
    for k, x in enumerate(xs):
        ref_tv, ref_pix, _ = oracle(x, 1.0, 1.0)
        assert abs(tv[k].double() - ref_tv) <= 1e-5 * abs(ref_tv)
        assert abs(pix[k].double() - ref_pix) <= 1e-5 * abs(ref_pix)
    with pytest.raises(ValueError, match=r"shape \(K, N, C, H, W\)"):
        losses.stacked_tv_pixel(images((2, 3, 5, 6)), impl="triton")


def test_bad_inputs_are_named(monkeypatch):
    with pytest.raises(ValueError, match="impl"):
        losses.tv_pixel(images((1, 1, 2, 2)), impl="gpu")
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        losses.tv_pixel(images((2, 2, 2)), impl="triton")
    with pytest.raises(ValueError, match="empty"):
        losses.tv_pixel(images((0, 1, 2, 2)), impl="triton")
    with pytest.raises(TypeError, match="floating-point"):
        losses.tv_pixel(torch.ones(1, 1, 2, 2, dtype=torch.uint8), impl="triton")
    with pytest.raises(TypeError, match="torch.Tensor"):
        losses.weighted_tv_pixel([[[[0.5]]]], 1.0, 1.0)
    with pytest.raises(TypeError, match="dtypes float32, bfloat16"):
        losses.tv_pixel(images((1, 1, 2, 2), torch.float64), impl="triton")
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        losses.tv_pixel(images((1, 1, 2, 2)), impl="triton")


def test_double_backward_is_refused():
    x = images((2, 1, 4, 4)).requires_grad_()
    (g,) = torch.autograd.grad(_loss(x, "triton"), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        g.sum().backward()


@pytest.mark.compile
def test_compiles_without_graph_breaks():
    xs = images((2, 2, 1, 7, 9))
    assert_compiles(_loss, xs[0], xs)


# ---------------------------------------------------------------- CUDA: the same checks, large shapes


def reference64(x, w_tv, w_pix):
    from tldr_fast.losses import tv_pixel as reference

    x = x.detach().double().requires_grad_()
    tv, pix = reference(x, impl="torch")
    (g,) = torch.autograd.grad(w_tv * tv + w_pix * pix, x)
    return tv.detach(), pix.detach(), g


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape", [(65536, 1, 28, 28), (4096, 3, 32, 32), (3, 3, 517, 1023), (5, 1, 1, 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64(shape, dtype):
    x = images(shape, dtype).cuda().requires_grad_()
    tol = TOL[dtype]
    tv, pix = losses.tv_pixel(x, impl="auto")
    (g,) = torch.autograd.grad(0.7 * tv + 1.3 * pix, x)
    ref_tv, ref_pix, ref_g = reference64(x, 0.7, 1.3)
    assert abs(tv.double() - ref_tv) <= tol * abs(ref_tv) + 1e-12
    assert abs(pix.double() - ref_pix) <= tol * abs(ref_pix) + 1e-12
    assert rms(g.double() - ref_g) <= tol * rms(ref_g) + 1e-12
    loss, _, _ = losses.weighted_tv_pixel(x, 0.7, 1.3)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, g)


@pytest.mark.cuda
def test_cuda_poison_and_vmap(monkeypatch):
    xs = images((3, 1024, 1, 28, 28)).cuda()
    ref_g = torch.stack([grad(lambda x: _loss(x, "torch"))(x) for x in xs])
    torch.testing.assert_close(vmap(grad(lambda x: _loss(x, "auto")))(xs), ref_g)
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    x = xs[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(_loss(x, "auto"), x)
    assert torch.isfinite(g).all()


@pytest.mark.cuda
@pytest.mark.compile
def test_cuda_compiles_without_graph_breaks():
    xs = images((2, 512, 1, 28, 28)).cuda()
    assert_compiles(_loss, xs[0], xs)
    weighted = torch.compile(
        lambda x: losses.weighted_tv_pixel(x, 0.3, 0.7, impl="triton")[0], fullgraph=True
    )
    torch.testing.assert_close(weighted(xs[0]), _loss(xs[0], "triton"))
