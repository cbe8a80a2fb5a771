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

`ssim_matrices` computes several matrices at once, and with a torch.distributed process group
splits their blocks over its ranks and all-gathers them. The blocks are the single process's
(`matrix_blocks`), not finer ones: splitting a block's columns changes the shapes of its matmul and
reduction, and with them the float32 rounding, so only whole blocks keep the result bit-identical.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tldr_fast.distributed import ranks_with_other_digests
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
    return ssim_matrices([(A, B)], chunk_size, device, impl)[0]


def ssim_matrices(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    impl: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """`ssim_matrix(A, B)` of every (A, B) in `pairs` (impl "auto" decides per pair).

    Each matrix is computed in blocks of rows x columns (`matrix_blocks`). With a process group,
    the blocks of all pairs are split over its ranks (`split_blocks`), each rank computes its own
    and the blocks are all-gathered, so that every rank returns all the matrices. A block's
    values depend only on its inputs and its shape, and every block has the single process's
    shape, so the matrices are bit-identical to the single process's at the same thread count.
    Every rank must pass the same pairs: their sha256 digests are compared first.
    """
    for A, B in pairs:
        _check_pair(A, B, "A", "B", same_count=False)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    devices = [torch.device(device) if device is not None else A.device for A, _ in pairs]
    dtypes = [_compute_dtype(A, B) for A, B in pairs]
    blocks = matrix_blocks(pairs, chunk_size, impl)
    outs = [
        torch.empty(A.shape[0], B.shape[0], dtype=t, device=d)
        for (A, B), t, d in zip(pairs, dtypes, devices, strict=True)
    ]
    if group is None or dist.get_world_size(group) == 1:
        for block, values in _compute_blocks(pairs, blocks, devices, dtypes):
            outs[block.pair][block.rows, block.cols] = values
    else:
        _check_same_pairs(pairs, group)
        _compute_shared(pairs, blocks, devices, dtypes, outs, group)
    return outs


def _compute_shared(pairs, blocks: Sequence[Block], devices, dtypes, outs, group) -> None:
    """Fill `outs` with every block: this rank's computed, the others' all-gathered (each rank's
    values padded to the largest rank's share, in the widest of the pairs' dtypes)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ranges = split_blocks([b.size for b in blocks], world)
    counts = [sum(b.size for b in blocks[start:stop]) for start, stop in ranges]
    wire = _collective_device(group)
    wire_dtype = functools.reduce(torch.promote_types, dtypes, torch.float32)
    mine = torch.zeros(max(counts), dtype=wire_dtype, device=wire)
    start, stop = ranges[rank]
    offset = 0
    for block, values in _compute_blocks(pairs, blocks[start:stop], devices, dtypes):
        mine[offset : offset + block.size] = values.reshape(-1)
        offset += block.size
    gathered = torch.empty(world * len(mine), dtype=wire_dtype, device=wire)
    if len(mine):
        dist.all_gather_single(gathered, mine, group=group)
    for r, (start, stop) in enumerate(ranges):
        offset = r * len(mine)
        for block in blocks[start:stop]:
            values = gathered[offset : offset + block.size].view(block.shape)
            # Back in the pair's dtype, exactly: the wire dtype is at least as wide.
            outs[block.pair][block.rows, block.cols] = values
            offset += block.size


@dataclass(frozen=True)
class Block:
    """Rows [row_start, row_stop) x columns [col_start, col_stop) of pair `pair`'s matrix, computed with `impl`."""

    pair: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    impl: str

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def cols(self) -> slice:
        return slice(self.col_start, self.col_stop)

    @property
    def shape(self) -> tuple[int, int]:
        return self.row_stop - self.row_start, self.col_stop - self.col_start

    @property
    def size(self) -> int:
        rows, cols = self.shape
        return rows * cols


def matrix_blocks(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    chunk_size: int | None = None,
    impl: str = "auto",
) -> list[Block]:
    """The blocks of every pair's matrix, pair by pair, row block by row block: at most 128 rows
    and chunk_size pairs each (see ssim_matrix), with impl "auto" resolved per pair."""
    blocks = []
    for k, (A, B) in enumerate(pairs):
        m, n, cp = A.shape[0], B.shape[0], _positions(A)
        chunk = chunk_size or max(1, _BLOCK_ELEMENTS // cp)
        check_positive_int(chunk, "chunk_size")
        chosen = impl
        if impl == "auto":
            chosen = "compiled" if m * n * cp >= _COMPILE_ABOVE else "eager"
        rows = min(m, 128, chunk) or 1
        cols = max(1, chunk // rows)
        blocks += [
            Block(k, i, min(i + rows, m), j, min(j + cols, n), chosen)
            for i in range(0, m, rows)
            for j in range(0, n, cols)
        ]
    return blocks


def split_blocks(sizes: Sequence[int], world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's blocks: contiguous, and block k (of `sizes` pairs each, T in
    all) goes to rank floor(W * (pairs before k) / T), so each rank holds T / W pairs to within
    one block; a rank may hold none (more ranks than blocks, or blocks larger than T / W)."""
    check_positive_int(world_size, "world_size")
    total = max(sum(sizes), 1)
    owners, before = [], 0
    for size in sizes:
        owners.append(before * world_size // total)
        before += size
    return [
        (bisect.bisect_left(owners, r), bisect.bisect_right(owners, r)) for r in range(world_size)
    ]


def _compute_blocks(
    pairs, blocks: Sequence[Block], devices, dtypes
) -> Iterator[tuple[Block, torch.Tensor]]:
    """(block, its SSIM values) for every block in order, each row block's statistics computed once."""
    rows_key, row_stats = None, None
    for block in blocks:
        A, B = pairs[block.pair]
        device, dtype = devices[block.pair], dtypes[block.pair]
        if rows_key != (block.pair, block.row_start, block.row_stop):
            rows_key = (block.pair, block.row_start, block.row_stop)
            mu_x, var_x, win_x = _window_stats(A[block.rows].to(device=device, dtype=dtype))
            # (M, C*P, 49) -> (C*P, M, 49), scaled so that the matmul yields 2 * cov directly.
            win_x = win_x.transpose(0, 1).mul_(2 * _COV_NORM / _N).contiguous()
            row_stats = mu_x.T.unsqueeze(-1), var_x.T.unsqueeze(-1), win_x
        mu_x, var_x, win_x = row_stats
        mu_y, var_y, win_y = _window_stats(B[block.cols].to(device=device, dtype=dtype))
        cov2 = torch.bmm(win_x, win_y.permute(1, 2, 0))
        pointwise = _compiled_ssim_mean() if block.impl == "compiled" else _ssim_mean
        yield block, pointwise(cov2, mu_x, mu_y.T.unsqueeze(1), var_x, var_y.T.unsqueeze(1), 0)


def _check_same_pairs(pairs, group: dist.ProcessGroup) -> None:
    """Refuse pairs that differ from rank 0's: the sha256 of every shape, dtype and byte,
    compared across the group's ranks (`distributed.ranks_with_other_digests`)."""
    digest = hashlib.sha256()
    for t in (t for pair in pairs for t in pair):
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)} {t.dtype};".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    (differing,) = ranks_with_other_digests([digest.digest()], group, _collective_device(group))
    if differing:
        raise ValueError(
            f"rank {', '.join(map(str, differing))} passed other SSIM pairs than rank 0 (sha256 "
            f"differs): every rank must pass the same images and labels"
        )


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
