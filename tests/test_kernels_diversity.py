"""Triton diversity kernel (tldr_fast.kernels.diversity) against a float64 N x N oracle.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small; the `cuda` tests repeat the checks at large shapes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap

from tldr_fast import losses
from tldr_fast.kernels import diversity as kdiv
from tldr_fast.kernels import runtime

pytestmark = pytest.mark.triton

NS = (2, 3, 67, 300)
DS = (1, 5, 64, 200)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Loss weights as a caller would set them (no fp32-subnormal weights: those underflow to zero).
WEIGHTS = st.one_of(st.just(0.0), st.floats(1e-3, 2.0), st.floats(-2.0, -1e-3))


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # The interpreter runs tl.dot through numpy; OpenBLAS threads spinning on a shared 2-core box
    # make it ~10x slower.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def oracle(feat: torch.Tensor, normalized: bool, w_cos: float, w_ortho: float):
    """Naive float64 N x N formulation: losses, dL/dF, and the natural scales of cos and dL/dF."""
    f = feat.detach().double().requires_grad_()
    n = f.shape[0]
    fn = f / f.norm(dim=1, keepdim=True).clamp_min(kdiv.EPS)
    cosines = fn @ fn.T
    off_diag = ~torch.eye(n, dtype=torch.bool)
    cos = cosines[off_diag].sum() / (n * (n - 1))
    rows = fn if normalized else f
    ortho = (rows @ rows.T - torch.eye(n, dtype=torch.float64)).square().sum() / n**2
    (g,) = torch.autograd.grad(w_cos * cos + w_ortho * ortho, f)
    # Size of the terms the kernel adds up: errors are measured against these, since a signed mean
    # cosine (or a gradient after removing its radial part) can be far smaller than its terms.
    cos_scale = cosines[off_diag].abs().sum() / (n * (n - 1))
    inv_norm = 1 / f.norm(dim=1, keepdim=True).clamp_min(kdiv.EPS)
    eye = torch.eye(n, dtype=torch.float64)
    cos_part = 2 * abs(w_cos) * (fn.sum(0).abs() + fn.abs()) / (n * (n - 1)) * inv_norm
    ortho_part = 4 * abs(w_ortho) * ((rows @ rows.T).abs() + eye) @ rows.abs() / n**2
    g_scale = cos_part + (ortho_part * inv_norm if normalized else ortho_part)
    return cos.detach(), ortho.detach(), g, cos_scale.detach(), g_scale.detach()


def rms(t: torch.Tensor) -> float:
    return t.double().square().mean().sqrt().item()


def run_triton(feat: torch.Tensor, normalized: bool, w_cos: float, w_ortho: float):
    f = feat.detach().clone().requires_grad_()
    cos, ortho = losses.diversity_losses(f, normalized=normalized, impl="triton")
    (g,) = torch.autograd.grad(w_cos * cos + w_ortho * ortho, f)
    return cos, ortho, g


def check_against_oracle(feat, normalized=True, w_cos=0.7, w_ortho=1.3):
    tol = TOL[feat.dtype]
    cos, ortho, g = run_triton(feat, normalized, w_cos, w_ortho)
    assert cos.dtype == ortho.dtype == torch.float32
    assert g.dtype == feat.dtype and g.shape == feat.shape
    ref_cos, ref_ortho, ref_g, cos_scale, g_scale = oracle(feat, normalized, w_cos, w_ortho)
    assert abs(cos.double() - ref_cos) <= tol * max(abs(ref_cos), cos_scale), (cos, ref_cos)
    assert abs(ortho.double() - ref_ortho) <= tol * abs(ref_ortho) + 1e-12, (ortho, ref_ortho)
    err = rms(g.double() - ref_g)
    assert err <= tol * (rms(ref_g) + rms(g_scale)), (err, rms(ref_g), rms(g_scale))


def features(n: int, d: int, dtype=torch.float32, signed: bool = True, scale: float = 1.0):
    f = torch.randn(n, d, dtype=torch.float64)
    if not signed:  # post-LeakyReLU-like features: mostly positive, so the cosines do not cancel
        f = f.abs() + 0.1
    return (scale * f).to(dtype)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_fp32_matches_oracle_on_issue_grid(n, d):
    check_against_oracle(features(n, d, signed=False))
    check_against_oracle(features(n, d), normalized=n % 2 == 0)


# No shrink phase: each example runs interpreted kernels, so shrinking would take minutes.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    n=st.sampled_from((2, 3, 17, 67, 130)),  # N = 300 is on the grid test
    d=st.sampled_from(DS + (33, 257)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    normalized=st.booleans(),
    signed=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    w_cos=WEIGHTS,
    w_ortho=WEIGHTS,
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(n, d, dtype, normalized, signed, scale, w_cos, w_ortho, seed):
    torch.manual_seed(seed)
    check_against_oracle(features(n, d, dtype, signed, scale), normalized, w_cos, w_ortho)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [40, 300])
def test_backward_over_several_column_tiles(n, dtype):
    # D = 300 spans two column tiles: the backward goes through its fp32 scratch sweep.
    check_against_oracle(features(n, 300, dtype, signed=False))


def test_both_routes_chosen_by_shape_only():
    assert kdiv.uses_sample_route(64, 64) and kdiv.uses_sample_route(2, 200)
    assert not kdiv.uses_sample_route(65, 64)


def test_nearly_orthogonal_rows_do_not_cancel():
    # D >> N, rows almost orthonormal: Ortho is tiny next to ||G||^2; the N x N route keeps it exact.
    q, _ = torch.linalg.qr(torch.randn(200, 8, dtype=torch.float64))
    feat = (q.T + 1e-3 * torch.randn(8, 200, dtype=torch.float64)).float()
    check_against_oracle(feat)


def test_zero_row_and_non_contiguous_input():
    feat = features(67, 5, signed=False)
    feat[3] = 0
    check_against_oracle(feat)
    check_against_oracle(features(64, 67).T)  # a transposed view: strided loads
    check_against_oracle(features(5, 67, signed=False).T)


def _poisoned(real):
    def make(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    return make


@pytest.mark.parametrize("n,d", [(67, 64), (40, 300), (3, 5)])
def test_every_output_element_written(monkeypatch, n, d):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    feat = features(n, d, signed=False)
    cos, ortho, g = run_triton(feat, True, 0.5, 0.5)
    assert torch.isfinite(cos) and torch.isfinite(ortho) and torch.isfinite(g).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    for n, d in [(67, 5), (3, 64)]:
        feat = features(n, d)
        feat[1, 0] = bad
        cos, ortho, g = run_triton(feat, True, 1.0, 1.0)
        assert torch.isnan(cos) and torch.isnan(ortho) and torch.isnan(g).any()


def _loss(feat, impl):
    cos, ortho = losses.diversity_losses(feat, impl=impl)
    return 0.3 * cos + 0.7 * ortho


@pytest.mark.parametrize("n,d", [(40, 16), (6, 16)])
def test_vmap_over_generators_folds_into_one_batch(n, d):
    feats = torch.randn(3, n, d)
    ref = torch.stack([_loss(f, "torch") for f in feats])
    torch.testing.assert_close(vmap(lambda f: _loss(f, "triton"))(feats), ref, rtol=1e-5, atol=1e-7)
    ref_g = torch.stack([grad(lambda f: _loss(f, "torch"))(f) for f in feats])
    got_g = vmap(grad(lambda f: _loss(f, "triton")))(feats)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-7)
    outer = grad(lambda fs: vmap(lambda f: _loss(f, "triton"))(fs).sum())(feats)
    torch.testing.assert_close(outer, ref_g, rtol=1e-5, atol=1e-7)
    nested = vmap(vmap(lambda f: _loss(f, "triton")))(feats.expand(2, *feats.shape))
    torch.testing.assert_close(nested, ref.expand(2, 3), rtol=1e-5, atol=1e-7)


def test_vmap_with_vmapped_dim_not_first():
    feats = torch.randn(40, 2, 16)
    got = vmap(lambda f: _loss(f, "triton"), in_dims=1)(feats)
    torch.testing.assert_close(got, torch.stack([_loss(feats[:, k], "torch") for k in range(2)]))


def test_only_one_loss_differentiated():
    feat = features(67, 5).requires_grad_()
    (g,) = torch.autograd.grad(losses.diversity_losses(feat, impl="triton")[1], feat)
    _, _, ref_g, _, g_scale = oracle(feat, True, 0.0, 1.0)
    assert rms(g.double() - ref_g) <= 1e-5 * (rms(ref_g) + rms(g_scale))


def test_auto_uses_torch_on_cpu_and_torch_impl_is_the_reference():
    feat = features(67, 5)
    assert losses.resolve_impl("auto", feat, "diversity") == "torch"
    from tldr_fast.losses import diversity_losses as reference

    for impl in ("auto", "torch"):
        got = losses.diversity_losses(feat, normalized=False, impl=impl)
        torch.testing.assert_close(got, reference(feat, normalized=False, impl="torch"))


def test_stacked_problems_are_one_launch_equal_to_each_alone():
    feats = torch.stack([features(67, 5), features(67, 5).flip(0), features(67, 5) + 1])
    cos, ortho = losses.stacked_diversity_losses(feats, impl="triton")
    torch.testing.assert_close((cos, ortho), kdiv.diversity_losses(feats), rtol=0, atol=0)
    for k, feat in enumerate(feats):
        ref_cos, ref_ortho, _, cos_scale, _ = oracle(feat, True, 1.0, 1.0)
        assert abs(cos[k].double() - ref_cos) <= 1e-5 * cos_scale
        assert abs(ortho[k].double() - ref_ortho) <= 1e-5 * abs(ref_ortho)
    with pytest.raises(ValueError, match=r"shape \(K, N, D\)"):
        losses.stacked_diversity_losses(features(4, 3), impl="triton")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="impl"):
        losses.diversity_losses(features(4, 3), impl="cuda")
    with pytest.raises(ValueError, match="N >= 2"):
        losses.diversity_losses(features(1, 3), impl="triton")
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        losses.diversity_losses(torch.randn(2, 3, 4), impl="triton")
    with pytest.raises(ValueError, match="D >= 1"):
        losses.diversity_losses(torch.randn(3, 0), impl="triton")
    with pytest.raises(TypeError, match="floating-point"):
        losses.diversity_losses(torch.ones(3, 2, dtype=torch.int64), impl="triton")
    with pytest.raises(TypeError, match="torch.Tensor"):
        losses.diversity_losses([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="dtypes float32, bfloat16"):
        losses.diversity_losses(features(4, 3, torch.float64), impl="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        losses.diversity_losses(features(4, 3), impl="triton")


def test_double_backward_is_refused():
    feat = features(6, 4).requires_grad_()
    (g,) = torch.autograd.grad(_loss(feat, "triton"), feat, create_graph=True)
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        g.sum().backward()


def assert_compiles(loss, one: torch.Tensor, batch: torch.Tensor, **tol) -> None:
    """loss(x, impl) compiles with fullgraph and matches eager: grad, vmap and forward + .backward()
    on the Triton ops (opaque to Dynamo, so the interpreter runs them under compile on CPU too),
    and the engine's nested grad of vmap, which "auto" compiles on the torch path."""
    triton = lambda x: loss(x, "triton")
    compiled = torch.compile(grad(triton), fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(one), grad(triton)(one), **tol)
    compiled = torch.compile(vmap(triton), fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(batch), vmap(triton)(batch), **tol)
    leaf = one.clone().requires_grad_()
    torch.compile(triton, fullgraph=True, dynamic=False)(leaf).backward()
    torch.testing.assert_close(leaf.grad, grad(triton)(one), **tol)
    nested = grad(lambda a: vmap(lambda x: loss(x, "auto"))(a).sum())
    compiled = torch.compile(nested, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(batch), vmap(grad(triton))(batch), **tol)


@pytest.mark.compile
def test_compiles_without_graph_breaks():
    feat = features(67, 5)
    assert_compiles(_loss, feat, torch.stack([feat, feat.flip(0)]))


# ---------------------------------------------------------------- CUDA: the same checks, large shapes


def reference64(feat, normalized, w_cos, w_ortho):
    """float64 losses and gradient via the plain-torch reference (no N x N matrix when D < N)."""
    from tldr_fast.losses import diversity_losses as reference

    f = feat.detach().double().requires_grad_()
    cos, ortho = reference(f, normalized=normalized, impl="torch")
    (g,) = torch.autograd.grad(w_cos * cos + w_ortho * ortho, f)
    return cos.detach(), ortho.detach(), g


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(65536, 256), (8192, 1024), (1000, 1024), (4099, 67), (3, 5)])
@pytest.mark.parametrize("normalized", [True, False])
def test_cuda_matches_float64(n, d, dtype, normalized):
    feat = (torch.randn(n, d, device="cuda").abs() + 0.1).to(dtype)
    tol = TOL[dtype]
    cos, ortho, g = run_triton(feat, normalized, 0.7, 1.3)
    ref_cos, ref_ortho, ref_g = reference64(feat, normalized, 0.7, 1.3)
    assert abs(cos.double() - ref_cos) <= tol * abs(ref_cos)
    assert abs(ortho.double() - ref_ortho) <= tol * abs(ref_ortho)
    assert rms(g.double() - ref_g) <= tol * rms(ref_g) + 1e-30


@pytest.mark.cuda
def test_cuda_poison_nan_and_vmap(monkeypatch):
    feats = torch.randn(3, 8192, 256, device="cuda")
    ref = torch.stack([_loss(f, "torch") for f in feats])
    torch.testing.assert_close(vmap(lambda f: _loss(f, "auto"))(feats), ref, rtol=1e-5, atol=1e-6)
    ref_g = torch.stack([grad(lambda f: _loss(f, "torch"))(f) for f in feats])
    torch.testing.assert_close(
        vmap(grad(lambda f: _loss(f, "auto")))(feats), ref_g, rtol=1e-4, atol=1e-9
    )
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    cos, ortho, g = run_triton(feats[0], True, 1.0, 1.0)
    assert torch.isfinite(cos) and torch.isfinite(ortho) and torch.isfinite(g).all()
    bad = feats[1].clone()
    bad[5, 7] = float("nan")
    assert torch.isnan(losses.diversity_losses(bad)[0])


@pytest.mark.cuda
@pytest.mark.compile
def test_cuda_compiles_without_graph_breaks():
    feats = torch.randn(2, 4096, 256, device="cuda")
    assert_compiles(_loss, feats[0], feats, rtol=1e-4, atol=1e-9)
