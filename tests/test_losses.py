"""Every loss and its gradient against a naive float64 formula (N x N Gram, loops for TV)."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from relative_error import rel_rms

from tldr_fast import losses

# --- naive references -------------------------------------------------------------------------


def naive_kl(logits, cond):
    total = 0.0
    for z, c in zip(logits, cond, strict=True):
        q = torch.softmax(z, 0)
        total = total + sum(c[k] * torch.log(c[k] / q[k]) for k in range(len(c)) if c[k] > 0)
    return total / len(logits)


def naive_ce(logits, labels):
    return sum(
        -torch.log(torch.softmax(z, 0)[y]) for z, y in zip(logits, labels, strict=True)
    ) / len(logits)


def naive_cos(feat):
    n = feat.shape[0]
    fn = feat / feat.norm(dim=1, keepdim=True)
    g = fn @ fn.T
    return (g.sum() - g.diagonal().sum()) / (n * (n - 1))


def naive_ortho(feat, normalized=True):
    f = feat / feat.norm(dim=1, keepdim=True) if normalized else feat
    g = f @ f.T
    return ((g - torch.eye(len(f), dtype=f.dtype)) ** 2).sum() / len(f) ** 2


def naive_tv(x):
    n, c, h, w = x.shape
    total = 0.0
    for i, ch, r, s in itertools.product(range(n), range(c), range(h), range(w)):
        if r + 1 < h:
            total = total + (x[i, ch, r + 1, s] - x[i, ch, r, s]) ** 2
        if s + 1 < w:
            total = total + (x[i, ch, r, s + 1] - x[i, ch, r, s]) ** 2
    return total / n


def naive_pix(x):
    return (torch.clamp(-x, min=0).sum() + torch.clamp(x - 1, min=0).sum()) / x.shape[0]


def check_value_and_grad(fast, naive, *inputs, tol=1e-10):
    """fast and naive agree in value and in the gradient wrt the first input (float64)."""
    a = inputs[0].detach().double().requires_grad_(True)
    b = inputs[0].detach().double().requires_grad_(True)
    rest = inputs[1:]
    va, vb = fast(a, *rest), naive(b, *rest)
    assert va.dtype == torch.float64
    assert rel_rms(va, vb) < tol, (float(va), float(vb))
    (ga,) = torch.autograd.grad(va, a)
    (gb,) = torch.autograd.grad(vb, b)
    assert rel_rms(ga, gb) < tol


# --- classification terms ---------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 2), (5, 3), (7, 10)])
def test_kl_matches_naive(n, k):
    logits = torch.randn(n, k, dtype=torch.float64) * 3
    cond = torch.softmax(torch.randn(n, k, dtype=torch.float64), 1)
    check_value_and_grad(losses.kl, naive_kl, logits, cond)


def test_kl_with_hot_vectors_equals_ce():
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    hot = torch.nn.functional.one_hot(labels, 4).double()
    assert rel_rms(losses.kl(logits, hot), losses.ce(logits, labels)) < 1e-12


@pytest.mark.parametrize("n,k", [(1, 2), (9, 10)])
def test_ce_matches_naive(n, k):
    logits = torch.randn(n, k, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (n,))
    check_value_and_grad(losses.ce, naive_ce, logits, labels)


def test_kl_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="cond must have the shape"):
        losses.kl(torch.randn(3, 4), torch.rand(3, 5))


# --- diversity terms --------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(2, 1), (2, 5), (9, 4), (4, 9), (16, 16), (33, 7), (3, 300)])
def test_cosine_matches_naive(n, d):
    feat = torch.randn(n, d, dtype=torch.float64) + 0.3
    check_value_and_grad(losses.cosine_diversity, naive_cos, feat)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("n,d", [(2, 1), (2, 5), (9, 4), (4, 9), (16, 16), (33, 7), (3, 300)])
def test_ortho_matches_naive(n, d, normalized):
    feat = torch.randn(n, d, dtype=torch.float64) + 0.3
    check_value_and_grad(
        lambda f: losses.ortho_diversity(f, normalized=normalized),
        lambda f: naive_ortho(f, normalized=normalized),
        feat,
    )


@pytest.mark.parametrize("normalized", [True, False])
def test_diversity_losses_equals_the_separate_terms(normalized):
    feat = torch.randn(11, 6, dtype=torch.float64)
    cos, ortho = losses.diversity_losses(feat, normalized=normalized)
    assert rel_rms(cos, losses.cosine_diversity(feat)) < 1e-13
    assert rel_rms(ortho, losses.ortho_diversity(feat, normalized=normalized)) < 1e-13
    # Gradient of a weighted sum, as the objective uses it.
    f1 = feat.clone().requires_grad_(True)
    f2 = feat.clone().requires_grad_(True)
    c, o = losses.diversity_losses(f1, normalized=normalized)
    (g1,) = torch.autograd.grad(3 * c + 2 * o, f1)
    (g2,) = torch.autograd.grad(3 * naive_cos(f2) + 2 * naive_ortho(f2, normalized), f2)
    assert rel_rms(g1, g2) < 1e-10


def test_diversity_extremes():
    same = torch.ones(5, 3, dtype=torch.float64)
    assert float(losses.cosine_diversity(same)) == pytest.approx(1.0)
    orthonormal = torch.eye(4, dtype=torch.float64)
    assert float(losses.cosine_diversity(orthonormal)) == pytest.approx(0.0, abs=1e-15)
    assert float(losses.ortho_diversity(orthonormal)) == pytest.approx(0.0, abs=1e-15)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert float(losses.cosine_diversity(opposite)) == pytest.approx(-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    feat = torch.randn(64, 8) + 0.5
    ref_cos, ref_ortho = naive_cos(feat.to(dtype).double()), naive_ortho(feat.to(dtype).double())
    cos, ortho = losses.diversity_losses(feat.to(dtype))
    assert cos.dtype == torch.float32 and ortho.dtype == torch.float32
    assert rel_rms(cos, ref_cos) < 1e-5 and rel_rms(ortho, ref_ortho) < 1e-5
    x = torch.rand(3, 1, 9, 9).to(dtype)
    tv, _ = losses.tv_pixel(x)
    assert tv.dtype == torch.float32 and rel_rms(tv, naive_tv(x.double())) < 1e-5


def test_large_batch_does_not_build_n_by_n():
    # N = 4096 rows of D = 8: an N x N float64 Gram would be 128 MiB; the identity needs D x D.
    feat = torch.randn(4096, 8, dtype=torch.float64)
    cos, ortho = losses.diversity_losses(feat)
    small = feat[:512]
    assert rel_rms(losses.cosine_diversity(small), naive_cos(small)) < 1e-10
    assert torch.isfinite(cos) and torch.isfinite(ortho)


@pytest.mark.parametrize(
    "fn",
    [losses.cosine_diversity, losses.ortho_diversity, losses.diversity_losses],
)
def test_batch_of_one_is_refused(fn):
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(torch.randn(1, 16))


def test_zero_feature_row_stays_finite():
    feat = torch.randn(4, 5, dtype=torch.float64)
    feat[2] = 0
    feat.requires_grad_(True)
    cos, ortho = losses.diversity_losses(feat)
    (g,) = torch.autograd.grad(cos + ortho, feat)
    assert torch.isfinite(cos) and torch.isfinite(ortho) and torch.isfinite(g).all()


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be one of"):
        losses.diversity_losses(torch.randn(3, 2), impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        losses.tv_pixel(torch.rand(2, 1, 3, 3), impl="fast")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12), d=st.integers(1, 12), normalized=st.booleans(), seed=st.integers(0, 2**16)
)
def test_diversity_property(n, d, normalized, seed):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(n, d, generator=g, dtype=torch.float64)
    cos, ortho = losses.diversity_losses(feat, normalized=normalized)
    assert rel_rms(cos, naive_cos(feat)) < 1e-9
    assert rel_rms(ortho, naive_ortho(feat, normalized)) < 1e-9
    assert -1 - 1e-12 <= float(cos) <= 1 + 1e-12


# --- image priors -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (3, 3, 4, 3), (1, 2, 1, 6)])
def test_total_variation_matches_loops(shape):
    check_value_and_grad(losses.total_variation, naive_tv, torch.rand(shape, dtype=torch.float64))


def test_total_variation_of_single_pixels_is_zero():
    x = torch.rand(3, 2, 1, 1, requires_grad=True)
    tv = losses.total_variation(x)
    tv.backward()
    assert float(tv.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (3, 3, 4, 3)])
def test_pixel_range_matches_naive(shape):
    x = torch.randn(shape, dtype=torch.float64) + 0.5
    check_value_and_grad(losses.pixel_range, naive_pix, x)


def test_tv_pixel_is_both_terms():
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    tv, pix = losses.tv_pixel(x)
    assert rel_rms(tv, naive_tv(x)) < 1e-12 and rel_rms(pix, naive_pix(x)) < 1e-12
    assert float(losses.pixel_range(torch.rand(2, 1, 4, 4))) == 0.0


def test_image_terms_refuse_wrong_rank():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        losses.total_variation(torch.rand(4, 4))


# --- perturbation -----------------------------------------------------------------------------


def test_perturb_is_a_clamped_corner_of_the_ball():
    x = torch.rand(4, 1, 6, 5)
    noise = torch.randn_like(x)
    xp = losses.perturb(x, 0.1, noise)
    expected = (x + 0.1 * noise.sign()).clamp(0, 1)
    assert torch.equal(xp, expected)
    assert float((xp - x).abs().max()) <= 0.1 + 1e-7
    assert float(xp.min()) >= 0 and float(xp.max()) <= 1
    assert torch.equal(losses.perturb(x, 0.0, noise), x)


def test_perturb_is_differentiable_and_checks_shapes():
    x = torch.rand(2, 1, 3, 3, requires_grad=True) * 0.5 + 0.25
    losses.perturb(x, 0.1, torch.randn(2, 1, 3, 3)).sum().backward()
    with pytest.raises(ValueError, match="noise must have the shape"):
        losses.perturb(x, 0.1, torch.randn(2, 1, 3, 4))


def test_losses_compose_with_vmap():
    feat = torch.randn(3, 6, 5, dtype=torch.float64)
    cos, ortho = torch.func.vmap(losses.diversity_losses)(feat)
    for k in range(3):
        assert rel_rms(cos[k], naive_cos(feat[k])) < 1e-12
        assert rel_rms(ortho[k], naive_ortho(feat[k])) < 1e-12


# --- feature-statistics prior (beyond the paper) ----------------------------------------------


def naive_feature_statistics(a, running_mean, running_var):
    """Loops over channels and values: mean, unbiased variance, two Euclidean distances."""
    mean_sq, var_sq = 0.0, 0.0
    for c in range(a.shape[1]):
        values = a[:, c].reshape(-1)
        m = values.sum() / len(values)
        v = ((values - m) ** 2).sum() / (len(values) - 1)
        mean_sq = mean_sq + (m - running_mean[c]) ** 2
        var_sq = var_sq + (v - running_var[c]) ** 2
    return torch.sqrt(mean_sq) + torch.sqrt(var_sq)


@pytest.mark.parametrize(
    "shape", [(2, 1), (5, 3), (2, 3, 4, 5), (3, 4, 1, 1), (1, 2, 3, 3), (4, 2, 7)]
)
def test_feature_statistics_matches_loops(shape):
    a = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    running_mean = torch.randn(shape[1], dtype=torch.float64)
    running_var = torch.rand(shape[1], dtype=torch.float64) + 0.1
    check_value_and_grad(
        losses.feature_statistics, naive_feature_statistics, a, running_mean, running_var
    )


def _from_chunk_sums(a, shift, running_mean, running_var, chunk):
    """feature_statistics of a from shifted channel sums accumulated over chunks of its rows."""
    s1 = s2 = 0
    for start in range(0, a.shape[0], chunk):
        t1, t2 = losses.shifted_channel_sums(a[start : start + chunk], shift)
        s1, s2 = s1 + t1, s2 + t2
    count = a.numel() // a.shape[1]
    return losses.feature_statistics_from_sums(s1, s2, count, shift, running_mean, running_var)


@pytest.mark.parametrize(
    ("shape", "chunk"),
    [((2, 1), 1), ((5, 3), 2), ((2, 3, 4, 5), 1), ((6, 4, 1, 1), 4), ((4, 2, 7), 3)],
)
def test_feature_statistics_from_chunk_sums_equals_the_whole_batch(shape, chunk):
    a = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    shift = torch.randn(shape[1], dtype=torch.float64)
    running_mean = torch.randn(shape[1], dtype=torch.float64)
    running_var = torch.rand(shape[1], dtype=torch.float64) + 0.1
    check_value_and_grad(
        partial(_from_chunk_sums, chunk=chunk),
        lambda a, shift, rm, rv: naive_feature_statistics(a, rm, rv),
        a,
        shift,
        running_mean,
        running_var,
    )


def test_feature_statistics_from_sums_keeps_float32_accuracy_for_a_large_mean():
    # Activations with mean 1000 and variance 1: the running mean as the shift keeps S2 - S1^2/M
    # from cancelling in float32 (unshifted sums would lose the variance entirely).
    torch.manual_seed(0)
    a64 = torch.randn(4096, 3, dtype=torch.float64) + 1000.0
    running_mean = torch.full((3,), 1000.0, dtype=torch.float64)
    running_var = torch.full((3,), 0.5, dtype=torch.float64)
    exact = losses.feature_statistics(a64, running_mean, running_var)
    a, rm, rv = a64.float(), running_mean.float(), running_var.float()
    ours = _from_chunk_sums(a, rm, rm, rv, 1000)
    assert abs(float(ours) - float(exact)) < 1e-4 * float(exact)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 5), p=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_feature_statistics_property(n, c, p, seed):
    """Zero exactly when the batch has the running statistics; invariant to the order of the samples."""
    if n * p < 2:
        return
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, p, generator=gen, dtype=torch.float64)
    channels = a.transpose(0, 1).reshape(c, -1)
    own = losses.feature_statistics(a, channels.mean(1), channels.var(1))
    assert float(own) < 1e-12
    shifted = losses.feature_statistics(a, channels.mean(1) + 1, channels.var(1))
    assert abs(float(shifted) - c**0.5) < 1e-9
    perm = torch.randperm(n, generator=gen)
    rm, rv = (
        torch.randn(c, generator=gen, dtype=torch.float64),
        torch.rand(c, generator=gen, dtype=torch.float64),
    )
    assert (
        rel_rms(losses.feature_statistics(a[perm], rm, rv), losses.feature_statistics(a, rm, rv))
        < 1e-12
    )


def test_feature_statistics_low_precision_accumulates_in_float32_and_nan_propagates():
    a = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16)
    out = losses.feature_statistics(a, torch.zeros(3), torch.ones(3))
    assert out.dtype == torch.float32
    expected = naive_feature_statistics(
        a.double(), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    )
    assert rel_rms(out, expected) < 1e-5
    a = torch.randn(4, 3)
    a[1, 2] = float("nan")
    assert torch.isnan(losses.feature_statistics(a, torch.zeros(3), torch.ones(3)))


def test_feature_statistics_bad_input():
    with pytest.raises(
        ValueError, match=r"\(N, C, \.\.\.\) input and \(C,\) statistics, got \(4, 3\), \(2,\)"
    ):
        losses.feature_statistics(torch.randn(4, 3), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"at least 2 values per channel, got input \(1, 3\)"):
        losses.feature_statistics(torch.randn(1, 3), torch.zeros(3), torch.ones(3))


# --- which implementation `impl` picks ----------------------------------------------------------


def test_auto_is_torch_on_cpu_at_any_size_and_under_compile():
    # meta tensors: the shapes of large problems without their memory
    assert (
        losses.resolve_impl("auto", torch.empty(1, 262144, 256, device="meta"), "diversity")
        == "torch"
    )
    assert losses.resolve_impl("auto", torch.empty(1, 65536, 1, 28, 28), "tv_pixel") == "torch"
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(x):
        seen.append(losses.resolve_impl("auto", x, "diversity"))
        return x + 1

    compiled(torch.randn(4, 3, 2))
    assert seen == ["torch"]


def test_triton_request_that_cannot_run_is_one_clear_line(monkeypatch):
    from tldr_fast.kernels import runtime

    with pytest.raises(
        TypeError, match=r"impl='triton' supports dtypes float32, bfloat16; got torch.float64"
    ):
        losses.resolve_impl("triton", torch.randn(4, 3, dtype=torch.float64), "diversity")
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor or the Triton interpreter"):
        losses.resolve_impl("triton", torch.randn(4, 3), "diversity")


@pytest.mark.cuda
def test_auto_follows_the_measured_table_on_cuda():
    # docs/kernels.md: Triton from N D >= 2^22 with D >= 256 (diversity, eager), from 16384
    # MNIST images (TV/pixel, eager); torch below.
    def features(n, d):
        return torch.empty(1, n, d, device="cuda")

    assert losses.resolve_impl("auto", features(16384, 256), "diversity") == "triton"
    assert losses.resolve_impl("auto", features(4096, 1024), "diversity") == "triton"
    assert losses.resolve_impl("auto", features(4096, 256), "diversity") == "torch"
    assert losses.resolve_impl("auto", features(262144, 64), "diversity") == "torch"
    assert losses.resolve_impl("auto", features(16384, 256).double(), "diversity") == "torch"
    assert (
        losses.resolve_impl("auto", torch.empty(1, 16384, 1, 28, 28, device="cuda"), "tv_pixel")
        == "triton"
    )
    assert (
        losses.resolve_impl("auto", torch.empty(1, 1024, 1, 28, 28, device="cuda"), "tv_pixel")
        == "torch"
    )
