"""Structural similarity (SSIM) of images in [0, 1], batched in torch, equal to scikit-image.

`ssim(a, b)` and `ssim_matrix(A, B)` equal `skimage.metrics.structural_similarity(x, y,
data_range=1.0)` with its default arguments (colour: `channel_axis` set, which averages the
channels). For every valid 7x7 window w (skimage crops (7 - 1) // 2 pixels from each side, so the
windows never leave the image) and n = 49:

    mu_x = mean_w x,   var_x = n/(n-1) mean_w (x - mu_x)^2,   cov = n/(n-1) mean_w (x - mu_x)(y - mu_y)
    S    = (2 mu_x mu_y + C1) (2 cov + C2) / ((mu_x^2 + mu_y^2 + C1) (var_x + var_y + C2))
    C1 = 0.01^2, C2 = 0.03^2;   SSIM(x, y) = mean of S over channels and window positions.

Everything but the covariance is a per-image statistic, computed once. The covariance of every
pair (i, j) at position p is a dot product of the centred windows, so a pairwise matrix is one
batched matmul over positions, (C*P, M, 49) @ (C*P, 49, N), followed by a pointwise map and a mean
over positions; centring first keeps float32 free of the cancellation in E[xy] - E[x]E[y]. Blocks
of pairs bound the memory; on large problems the pointwise part is compiled (torch.compile fuses
its ten elementwise passes into one).
"""

from __future__ import annotations

import functools

import torch

from tldr_fast.validation import check_images, check_positive_int, check_unit_range

WIN_SIZE = 7
K1, K2 = 0.01, 0.03
C1, C2 = K1**2, K2**2  # data_range = 1
_N = WIN_SIZE * WIN_SIZE
_COV_NORM = _N / (_N - 1)  # skimage's default use_sample_covariance=True
# Pairs x channels x positions per block; about 64 MiB per float32 block, 5 blocks live at once.
_BLOCK_ELEMENTS = 1 << 24
# Above this many pair-positions the one-off compilation (~10 s on CPU) pays for itself.
_COMPILE_ABOVE = 1 << 28
_IMPLS = ("auto", "compiled", "eager")


def ssim(a: torch.Tensor, b: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """SSIM of each pair (a[i], b[i]); a and b are (N, C, H, W) in [0, 1]; returns (N,)."""
    _check_pair(a, b, "a", "b", same_count=True)
    dtype = _compute_dtype(a, b)
    chunk = chunk_size or max(1, _BLOCK_ELEMENTS // _positions(a))
    check_positive_int(chunk, "chunk_size")
    out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
    for start in range(0, a.shape[0], chunk):
        sl = slice(start, start + chunk)
        mu_x, var_x, win_x = _window_stats(a[sl].to(dtype))
        mu_y, var_y, win_y = _window_stats(b[sl].to(device=a.device, dtype=dtype))
        cov2 = (win_x * win_y).sum(-1).mul_(2 * _COV_NORM / _N)
        out[sl] = _ssim_mean(cov2, mu_x, mu_y, var_x, var_y, -1)
    return out


def ssim_matrix(
    A: torch.Tensor,
    B: torch.Tensor,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Pairwise SSIM: out[i, j] = SSIM(A[i], B[j]) for A (M, C, H, W) and B (N, C, H, W) in [0, 1].

    chunk_size is the number of pairs per block (peak memory about 5 * chunk_size * C * P *
    itemsize, P = (H - 6)(W - 6) window positions); by default a block holds 2^24 pair-positions.
    The work runs on `device` (default: A's device); only a block of each input is moved there at
    a time, and the (M, N) result stays there. impl: "eager", "compiled" (torch.compile of the
    pointwise part) or "auto" (compiled when M * N * C * P >= 2^28).
    """
    _check_pair(A, B, "A", "B", same_count=False)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    device = torch.device(device) if device is not None else A.device
    dtype = _compute_dtype(A, B)
    m, n, cp = A.shape[0], B.shape[0], _positions(A)
    chunk = chunk_size or max(1, _BLOCK_ELEMENTS // cp)
    check_positive_int(chunk, "chunk_size")
    if impl == "auto":
        impl = "compiled" if m * n * cp >= _COMPILE_ABOVE else "eager"
    pointwise = _compiled_ssim_mean() if impl == "compiled" else _ssim_mean
    rows = min(m, 128, chunk) or 1
    cols = max(1, chunk // rows)
    out = torch.empty(m, n, dtype=dtype, device=device)
    for i in range(0, m, rows):
        mu_x, var_x, win_x = _window_stats(A[i : i + rows].to(device=device, dtype=dtype))
        # (M, C*P, 49) -> (C*P, M, 49), scaled so that the matmul yields 2 * cov directly.
        win_x = win_x.transpose(0, 1).mul_(2 * _COV_NORM / _N).contiguous()
        mu_x, var_x = mu_x.T.unsqueeze(-1), var_x.T.unsqueeze(-1)
        for j in range(0, n, cols):
            mu_y, var_y, win_y = _window_stats(B[j : j + cols].to(device=device, dtype=dtype))
            cov2 = torch.bmm(win_x, win_y.permute(1, 2, 0))
            out[i : i + rows, j : j + cols] = pointwise(
                cov2, mu_x, mu_y.T.unsqueeze(1), var_x, var_y.T.unsqueeze(1), 0
            )
    return out


def _ssim_mean(cov2, mu_x, mu_y, var_x, var_y, dim: int) -> torch.Tensor:
    """Mean over `dim` (the channel-positions) of the SSIM map, given 2 * cov and the per-image moments."""
    num = (2 * mu_x * mu_y + C1) * (cov2 + C2)
    den = (mu_x * mu_x + mu_y * mu_y + C1) * (var_x + var_y + C2)
    return (num / den).mean(dim)


@functools.cache
def _compiled_ssim_mean():
    return torch.compile(_ssim_mean, dynamic=True)


def _window_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and (channel, position): window mean (N, C*P), sample variance (N, C*P), centred windows (N, C*P, 49)."""
    # A strided view (N, C, H-6, W-6, 7, 7) copied once; F.unfold (im2col) is far slower on CPU.
    win = x.unfold(2, WIN_SIZE, 1).unfold(3, WIN_SIZE, 1).reshape(x.shape[0], -1, _N)
    mu = win.mean(-1)
    win = win - mu.unsqueeze(-1)
    var = win.square().mean(-1).mul_(_COV_NORM)
    return mu, var, win


def _positions(x: torch.Tensor) -> int:
    """C * P: channels times valid window positions."""
    _, c, h, w = x.shape
    return c * (h - WIN_SIZE + 1) * (w - WIN_SIZE + 1)


def _compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def _check_pair(a, b, name_a: str, name_b: str, same_count: bool) -> None:
    check_images(a, name_a)
    check_images(b, name_b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same image shape (C, H, W), got "
            f"{tuple(a.shape[1:])} and {tuple(b.shape[1:])}"
        )
    if same_count and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has {a.shape[0]} images but {name_b} has {b.shape[0]}; ssim compares pairs"
        )
    if min(a.shape[2:]) < WIN_SIZE:
        raise ValueError(
            f"images must be at least {WIN_SIZE}x{WIN_SIZE} (the SSIM window), got {tuple(a.shape[2:])}"
        )
    check_unit_range(a.detach(), name_a)
    check_unit_range(b.detach(), name_b)
