"""Batched SSIM against scikit-image's structural_similarity(data_range=1.0) with default arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

from tldr_fast.ssim import ssim, ssim_matrix

TOL = 1e-4


def skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """scikit-image on one (C, H, W) pair; colour via channel_axis (the per-channel mean)."""
    x, y = a.double().permute(1, 2, 0).numpy(), b.double().permute(1, 2, 0).numpy()
    if x.shape[2] == 1:
        return structural_similarity(x[..., 0], y[..., 0], data_range=1.0)
    return structural_similarity(x, y, data_range=1.0, channel_axis=2)


def skimage_matrix(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    return np.array([[skimage_ssim(a, b) for b in B] for a in A])


def correlated_pairs(n: int, shape, gen: torch.Generator, dtype=torch.float64):
    """Random images and noisy, brightened copies of them: SSIM spread over (0, 1), not only near 0."""
    a = torch.rand(n, *shape, generator=gen, dtype=dtype)
    b = (0.7 * a + 0.3 * torch.rand(n, *shape, generator=gen, dtype=dtype)).clamp(0, 1)
    return a, b


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    from tldr_fast.datasets import load

    images, _ = load("mnist-bundled", split="test")
    return images[::25].double()  # 40 real digits, four of every class


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 9, 13), (3, 11, 7), (2, 7, 7)])
def test_matrix_equals_skimage_on_random_images(shape):
    gen = torch.Generator().manual_seed(1)
    a, b = correlated_pairs(5, shape, gen)
    got = ssim_matrix(a, b[:4], chunk_size=3).numpy()
    ref = skimage_matrix(a, b[:4])
    assert np.abs(got - ref).max() < TOL
    assert ref.std() > 0.01  # the pairs are not all alike


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 15, 17)])
def test_pairs_equal_skimage(shape):
    gen = torch.Generator().manual_seed(2)
    a, b = correlated_pairs(6, shape, gen)
    got = ssim(a, b).numpy()
    ref = np.array([skimage_ssim(x, y) for x, y in zip(a, b)])
    assert np.abs(got - ref).max() < TOL


def test_real_digits_equal_skimage_in_float32_and_float64(digits):
    ref = skimage_matrix(digits[:12], digits[8:24])
    for dtype in (torch.float64, torch.float32):
        got = ssim_matrix(digits[:12].to(dtype), digits[8:24].to(dtype)).double().numpy()
        assert np.abs(got - ref).max() < TOL, dtype
    assert ref.max() > 0.99 and ref.min() < 0.2  # identical digits and different ones


def test_real_rgb_images_equal_skimage(digits):
    # Colour images built from real digits: each channel a different digit.
    rgb = torch.cat([digits[:8], digits[8:16], digits[16:24]], dim=1)
    got = ssim_matrix(rgb[:5].float(), rgb[3:].float()).double().numpy()
    assert np.abs(got - skimage_matrix(rgb[:5], rgb[3:])).max() < TOL


def test_chunk_sizes_and_orientation_agree():
    gen = torch.Generator().manual_seed(3)
    a, b = correlated_pairs(9, (1, 12, 10), gen)
    full = ssim_matrix(a, b)
    for chunk in (1, 5, 200):
        torch.testing.assert_close(ssim_matrix(a, b, chunk_size=chunk), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(ssim_matrix(b, a), full.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(ssim(a, b, chunk_size=4), full.diagonal(), rtol=0, atol=1e-12)


def test_identical_and_constant_images():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(3, 1, 10, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    flat = torch.full((2, 1, 8, 8), 0.5, dtype=torch.float64)
    torch.testing.assert_close(ssim(flat, flat), torch.ones(2, dtype=torch.float64))
    black = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    assert abs(float(ssim_matrix(black, flat[:1])) - skimage_ssim(black[0], flat[0])) < TOL


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_pointwise_equals_eager():
    gen = torch.Generator().manual_seed(5)
    a, b = correlated_pairs(7, (1, 28, 28), gen, dtype=torch.float32)
    eager = ssim_matrix(a, b, impl="eager")
    compiled = ssim_matrix(a, b, impl="compiled", chunk_size=20)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(6)
    a, b = correlated_pairs(1, (1, 7, 8), gen)
    a = (0.1 + 0.8 * a).requires_grad_()  # away from the [0, 1] edges for the finite differences
    assert torch.autograd.gradcheck(lambda x: ssim(x, b), (a,))


@settings(max_examples=15, deadline=None)
@given(
    c=st.sampled_from([1, 3]),
    h=st.integers(7, 14),
    w=st.integers(7, 14),
    m=st.integers(1, 3),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_equals_skimage(c, h, w, m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = correlated_pairs(max(m, n), (c, h, w), gen)
    got = ssim_matrix(a[:m], b[:n]).numpy()
    assert np.abs(got - skimage_matrix(a[:m], b[:n])).max() < TOL


@pytest.mark.cuda
def test_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(7)
    a, b = correlated_pairs(20, (3, 32, 32), gen, dtype=torch.float32)
    cpu = ssim_matrix(a, b)
    gpu = ssim_matrix(a, b, device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- bad input


def test_rejects_different_image_shapes():
    with pytest.raises(ValueError, match=r"same image shape .*\(1, 10, 10\) and \(1, 10, 11\)"):
        ssim_matrix(torch.rand(2, 1, 10, 10), torch.rand(2, 1, 10, 11))
    with pytest.raises(ValueError, match="same image shape"):
        ssim(torch.rand(2, 1, 10, 10), torch.rand(2, 3, 10, 10))


def test_rejects_unequal_pair_counts():
    with pytest.raises(ValueError, match="a has 2 images but b has 3"):
        ssim(torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8))


def test_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim_matrix(torch.rand(1, 1, 6, 9), torch.rand(1, 1, 6, 9))


def test_rejects_values_outside_unit_range_with_observed_min_max():
    with pytest.raises(ValueError, match=r"B must lie in \[0, 1\], observed min 0 and max 255"):
        ssim_matrix(
            torch.rand(1, 1, 8, 8),
            torch.cat([torch.zeros(1, 1, 8, 4), torch.full((1, 1, 8, 4), 255.0)], 3),
        )
    with pytest.raises(ValueError, match="observed min -0.5"):
        ssim(torch.full((1, 1, 8, 8), -0.5), torch.rand(1, 1, 8, 8))


def test_rejects_nan():
    x = torch.rand(1, 1, 8, 8)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ssim_matrix(x, torch.rand(1, 1, 8, 8))


def test_rejects_bad_layout_dtype_and_options():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ssim_matrix(torch.rand(8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        ssim_matrix(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="impl must be one of"):
        ssim_matrix(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), impl="triton")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        ssim_matrix(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), chunk_size=-3)
