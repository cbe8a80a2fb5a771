"""Fused cosine and orthogonality diversity losses over penultimate features F (N x D).

With f^_i = f_i / max(||f_i||, eps) (as `torch.nn.functional.normalize`), s = sum_i f^_i and
q = sum_i ||f^_i||^2 (= N unless a row is zero):

    Cos   = 1/(N(N-1)) sum_{i!=j} f^_i . f^_j          = (||s||^2 - q) / (N(N-1))
    Ortho = 1/N^2 sum_ij (G_ij - delta_ij)^2, G = F^ F^^T = (||F^^T F^||_F^2 - 2q + N) / N^2

`normalized=False` is the authors' variant: Ortho on the raw Gram F F^T (q -> ||F||_F^2); Cos is
always on unit rows. The route depends on shapes only: for N > D the *feature* route accumulates s
and the D x D matrix F^T F (never an N x N matrix); for N <= D the *sample* route builds the N x N
matrix, which is then the smaller one and avoids the cancellation of ||F^T F||^2 - 2q + N when the
rows are nearly orthogonal. Accumulation is fp32 for fp32 and bf16 features.

Gradient for loss weights (g_cos, g_ortho), c1 = 2 g_cos / (N(N-1)), c2 = 4 g_ortho / N^2:

    dL/df^_i = c1 (s - f^_i) + c2 (f^_i (F^^T F^) - f^_i)        [= c2 ((S - I) F^)_i, S = F^ F^^T]
    dL/df_i  = (g_i - [||f_i|| > eps] f^_i (f^_i . g_i)) / max(||f_i||, eps)

(for normalized=False the c2 term is taken with raw rows and bypasses the normalisation).
Kernels: `_row_norms_kernel` (inverse row norms), `_gram_kernel` (split-K partial Gram tiles, upper
triangle mirrored, fp32, reduced by a sum over chunks: deterministic, no atomics; also s on the
diagonal tiles), `_grad_kernel` (one row block per program: (A @ B) tile product, the cosine term
and the normalisation backward, fp32 scratch only when D spans several tiles).
"""

from __future__ import annotations

import torch

from tldr_fast.kernels.runtime import (
    DOT_PRECISION,
    INTERPRETED,
    kernel_op,
    refuse_double_backward,
    traced_input,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

EPS = 1e-12  # torch.nn.functional.normalize's default
# Split-K target: about two CTAs per SM of a 132-SM H100. More chunks would only enlarge the fp32
# partial Gram buffer that the second stage sums. The interpreter runs programs one after another,
# so there the fewest programs are fastest.
_TARGET_PROGRAMS = 1 if INTERPRETED else 264


def _next_pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(n))
    return min(p, hi) if hi else p


if triton is not None:

    @triton.jit
    def _row_norms_kernel(
        F,
        r_ptr,
        nrm2_ptr,
        N,
        D,
        stride_fb,
        stride_fn,
        stride_fd,
        EPS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """r_i = 1 / max(||f_i||, eps) and ||f_i||^2, fp32."""
        b = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        base = F + b.to(tl.int64) * stride_fb + rows.to(tl.int64)[:, None] * stride_fn
        acc = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(
                base + cols[None, :] * stride_fd,
                mask=row_ok[:, None] & (cols[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x * x, 1)
        norm = tl.maximum(tl.sqrt(acc), EPS, propagate_nan=tl.PropagateNan.ALL)
        tl.store(r_ptr + b * N + rows, 1.0 / norm, mask=row_ok)
        tl.store(nrm2_ptr + b * N + rows, acc, mask=row_ok)

    @triton.jit
    def _gram_kernel(
        X,
        r_ptr,
        out_ptr,
        s_ptr,
        K,
        M,
        k_per_prog,
        stride_xb,
        stride_xk,
        stride_xm,
        SCALE_K: tl.constexpr,
        SCALE_M: tl.constexpr,
        WRITE_S: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Partial Gram out[b, c] = X_c^T X_c over the c-th chunk of the K axis (tile pair ti <= tj).

        X[b, k, m] is F (k = sample, m = feature) on the feature route and F^T on the sample route;
        the unit-row scaling r multiplies along k (feature route) or m (sample route).
        """
        t = tl.program_id(0)
        c = tl.program_id(1)
        b = tl.program_id(2)
        n_tiles = tl.cdiv(M, BLOCK_M)
        ti = t // n_tiles
        tj = t % n_tiles
        if ti <= tj:
            offs_a = ti * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_b = tj * BLOCK_M + tl.arange(0, BLOCK_M)
            a_ok = offs_a < M
            b_ok = offs_b < M
            x_base = X + b.to(tl.int64) * stride_xb
            acc = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
            s_acc = tl.zeros([BLOCK_M], tl.float32)
            k_start = c * k_per_prog
            for k0 in range(k_start, k_start + k_per_prog, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                koff = ks.to(tl.int64)[None, :] * stride_xk
                # Both operands loaded as [BLOCK_M, BLOCK_K] (the transposed view of X's tile).
                xa = tl.load(
                    x_base + koff + offs_a[:, None] * stride_xm,
                    mask=a_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                xb = tl.load(
                    x_base + koff + offs_b[:, None] * stride_xm,
                    mask=b_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                if SCALE_K or WRITE_S:
                    rk = tl.load(r_ptr + b * K + ks, mask=k_ok, other=0.0)
                if WRITE_S:  # s sums unit rows even for the raw Gram
                    s_acc += tl.sum(xa * rk[None, :], 1)
                if SCALE_K:
                    xa = xa * rk[None, :]
                    xb = xb * rk[None, :]
                if DOT_BF16:
                    acc = tl.dot(xa.to(tl.bfloat16), tl.trans(xb.to(tl.bfloat16)), acc)
                else:
                    acc = tl.dot(xa, tl.trans(xb), acc, input_precision=PRECISION)
            if SCALE_M:
                ra = tl.load(r_ptr + b * M + offs_a, mask=a_ok, other=0.0)
                rb = tl.load(r_ptr + b * M + offs_b, mask=b_ok, other=0.0)
                acc = acc * ra[:, None] * rb[None, :]
            n_chunks = tl.num_programs(1)
            o_base = out_ptr + (b.to(tl.int64) * n_chunks + c) * M * M
            ok = a_ok[:, None] & b_ok[None, :]
            tl.store(o_base + offs_a[:, None] * M + offs_b[None, :], acc, mask=ok)
            tl.store(o_base + offs_b[None, :] * M + offs_a[:, None], acc, mask=ok)
            if WRITE_S:
                if ti == tj:
                    tl.store(s_ptr + (b * n_chunks + c) * M + offs_a, s_acc, mask=a_ok)

    @triton.jit
    def _grad_tile(
        A,
        Bm,
        F,
        s_ptr,
        b,
        rows,
        row_ok,
        r,
        c1,
        cols,
        K,
        D,
        stride_ab,
        stride_an,
        stride_ak,
        stride_bb,
        stride_bk,
        stride_bd,
        stride_fb,
        stride_fn,
        stride_fd,
        ALPHA_R: tl.constexpr,
        PROJECT_U: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """For one [rows, cols] tile: w = r g (+ u if unprojected), f^, and the partial f^ . g."""
        col_ok = cols < D
        a_base = A + b.to(tl.int64) * stride_ab + rows.to(tl.int64)[:, None] * stride_an
        b_base = Bm + b.to(tl.int64) * stride_bb + cols[None, :] * stride_bd
        u = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                a_base + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            bm = tl.load(
                b_base + ks.to(tl.int64)[:, None] * stride_bk,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if DOT_BF16:
                u = tl.dot(a.to(tl.bfloat16), bm.to(tl.bfloat16), u)
            else:
                u = tl.dot(a.to(tl.float32), bm.to(tl.float32), u, input_precision=PRECISION)
        if ALPHA_R:
            u = u * r[:, None]
        ok = row_ok[:, None] & col_ok[None, :]
        f = tl.load(
            F
            + b.to(tl.int64) * stride_fb
            + rows.to(tl.int64)[:, None] * stride_fn
            + cols[None, :] * stride_fd,
            mask=ok,
            other=0.0,
        ).to(tl.float32)
        fh = f * r[:, None]
        s = tl.load(s_ptr + b * D + cols, mask=col_ok, other=0.0)
        g = c1 * (s[None, :] - fh)
        if PROJECT_U:
            g = g + u
        w = r[:, None] * g
        if not PROJECT_U:
            w = w + u
        return w, fh, tl.sum(fh * g, 1)

    @triton.jit
    def _grad_kernel(
        A,
        Bm,
        F,
        r_ptr,
        s_ptr,
        c1_ptr,
        scratch,
        out,
        N,
        K,
        D,
        stride_ab,
        stride_an,
        stride_ak,
        stride_bb,
        stride_bk,
        stride_bd,
        stride_fb,
        stride_fn,
        stride_fd,
        EPS: tl.constexpr,
        ALPHA_R: tl.constexpr,
        PROJECT_U: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PRECISION: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dL/dF for a row block: r (g - [||f|| > eps] f^ (f^ . g)) (+ u on the raw-Gram route).

        u = alpha (A @ B) is the Gram term (A = F, B = c2 (G - I) on the feature route; A = the
        N x N weight matrix, B = F on the sample route); g = c1 (s - f^) (+ u when projected).
        """
        b = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        r = tl.load(r_ptr + b * N + rows, mask=row_ok, other=0.0)
        # Rows at or below eps were divided by eps, not their norm: no projection there.
        radial = tl.where(r < 1.0 / EPS, 1.0, 0.0)
        c1 = tl.load(c1_ptr + b)
        out_rows = b.to(tl.int64) * N * D + rows.to(tl.int64)[:, None] * D
        if SINGLE_TILE:
            cols = tl.arange(0, BLOCK_D)
            w, fh, fg = _grad_tile(
                A,
                Bm,
                F,
                s_ptr,
                b,
                rows,
                row_ok,
                r,
                c1,
                cols,
                K,
                D,
                stride_ab,
                stride_an,
                stride_ak,
                stride_bb,
                stride_bk,
                stride_bd,
                stride_fb,
                stride_fn,
                stride_fd,
                ALPHA_R,
                PROJECT_U,
                DOT_BF16,
                PRECISION,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
            )
            res = w - (r * radial * fg)[:, None] * fh
            tl.store(
                out + out_rows + cols[None, :],
                res.to(out.dtype.element_ty),
                mask=row_ok[:, None] & (cols[None, :] < D),
            )
        else:
            fg = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                w, fh, part = _grad_tile(
                    A,
                    Bm,
                    F,
                    s_ptr,
                    b,
                    rows,
                    row_ok,
                    r,
                    c1,
                    cols,
                    K,
                    D,
                    stride_ab,
                    stride_an,
                    stride_ak,
                    stride_bb,
                    stride_bk,
                    stride_bd,
                    stride_fb,
                    stride_fn,
                    stride_fd,
                    ALPHA_R,
                    PROJECT_U,
                    DOT_BF16,
                    PRECISION,
                    BLOCK_N,
                    BLOCK_K,
                    BLOCK_D,
                )
                fg += part
                tl.store(
                    scratch + out_rows + cols[None, :],
                    w,
                    mask=row_ok[:, None] & (cols[None, :] < D),
                )
            # The second sweep reads what other threads of this program stored.
            tl.debug_barrier()
            coef = r * radial * fg
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                ok = row_ok[:, None] & (cols[None, :] < D)
                f = tl.load(
                    F
                    + b.to(tl.int64) * stride_fb
                    + rows.to(tl.int64)[:, None] * stride_fn
                    + cols[None, :] * stride_fd,
                    mask=ok,
                    other=0.0,
                ).to(tl.float32)
                w = tl.load(scratch + out_rows + cols[None, :], mask=ok, other=0.0)
                res = w - coef[:, None] * (f * r[:, None])
                tl.store(out + out_rows + cols[None, :], res.to(out.dtype.element_ty), mask=ok)


def _bf16_dot(feat: torch.Tensor) -> bool:
    """bf16 tensor-core products for bf16 features; the Triton 3.9 interpreter's bf16 tl.dot
    multiplies raw bit patterns, so there the products stay fp32 (same math, more precise)."""
    return feat.dtype == torch.bfloat16 and not INTERPRETED


def uses_sample_route(n: int, d: int) -> bool:
    """N x N route when it is the smaller matrix (N <= D); shape-only, so no host sync."""
    return n <= d


def _row_norms(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, n, d = feat.shape
    r = torch.empty(nb, n, device=feat.device, dtype=torch.float32)
    nrm2 = torch.empty_like(r)
    block_n = 64
    _row_norms_kernel[(triton.cdiv(n, block_n), nb)](
        feat,
        r,
        nrm2,
        n,
        d,
        *feat.stride(),
        EPS=EPS,
        BLOCK_N=block_n,
        BLOCK_D=_next_pow2(d, hi=64),
        num_warps=8,
    )
    return r, nrm2


def _gram(x: torch.Tensor, r: torch.Tensor, scale_k: bool, scale_m: bool, write_s: bool):
    """Sum over k of x[b, k, :]^T x[b, k, :] (optionally row-scaled), fp32, split along k."""
    nb, k, m = x.shape
    # Tile sizes checked for sm_90 by compiling ahead of time: 64 x 64 tiles with 8 warps keep the
    # tf32x3 products free of register spills (128 x 128 spilled).
    block_m = _next_pow2(m, hi=128 if INTERPRETED else 64)
    block_k = 128 if INTERPRETED else 32
    n_tiles = triton.cdiv(m, block_m)
    live_tiles = n_tiles * (n_tiles + 1) // 2
    chunks = max(1, min(triton.cdiv(k, block_k), triton.cdiv(_TARGET_PROGRAMS, nb * live_tiles)))
    k_per_prog = triton.cdiv(triton.cdiv(k, chunks), block_k) * block_k
    chunks = triton.cdiv(k, k_per_prog)
    part = torch.empty(nb, chunks, m, m, device=x.device, dtype=torch.float32)
    s_part = torch.empty(nb, chunks, m, device=x.device, dtype=torch.float32) if write_s else part
    _gram_kernel[(n_tiles * n_tiles, chunks, nb)](
        x,
        r,
        part,
        s_part,
        k,
        m,
        k_per_prog,
        *x.stride(),
        SCALE_K=scale_k,
        SCALE_M=scale_m,
        WRITE_S=write_s,
        DOT_BF16=_bf16_dot(x),
        PRECISION=DOT_PRECISION,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
        num_warps=8,
    )
    return part.sum(1), (s_part.sum(1) if write_s else None)


def _forward(feat: torch.Tensor, normalized: bool):
    """(cos, ortho, r, s, gram) for a stack of problems feat (B, N, D)."""
    nb, n, d = feat.shape
    r, nrm2 = _row_norms(feat)
    q = (r * r * nrm2).sum(-1)
    if uses_sample_route(n, d):
        gram, _ = _gram(feat.transpose(1, 2), r, False, normalized, False)
        s = torch.bmm(r.unsqueeze(1), feat.float()).squeeze(1)
        eye = torch.eye(n, device=feat.device, dtype=torch.float32)
        ortho = (gram - eye).square().sum((-2, -1)) / n**2
    else:
        gram, s = _gram(feat, r, normalized, False, True)
        q_ortho = q if normalized else nrm2.sum(-1)
        ortho = (gram.square().sum((-2, -1)) - 2 * q_ortho + n) / n**2
    cos = ((s * s).sum(-1) - q) / (n * (n - 1))
    return cos, ortho, r, s, gram


def _backward(feat, r, s, gram, g_cos, g_ortho, normalized: bool) -> torch.Tensor:
    nb, n, d = feat.shape
    c1 = (2.0 / (n * (n - 1))) * g_cos.float()
    c2 = ((4.0 / n**2) * g_ortho.float())[:, None, None]
    eye = torch.eye(gram.shape[-1], device=feat.device, dtype=torch.float32)
    if uses_sample_route(n, d):
        weights = c2 * (gram - eye)
        a, bmat, alpha_r = (weights * r[:, None, :] if normalized else weights), feat, False
    else:
        a, bmat, alpha_r = feat, c2 * (gram - eye), normalized
    k = a.shape[-1]
    out = torch.empty(feat.shape, device=feat.device, dtype=feat.dtype)
    # The interpreter pays per operation, not per element: there, few big tiles are fastest.
    # Every program streams the K x D matrix B (from L2, N / block_n times), so row blocks should be
    # tall, but registers bound them: D <= 256 is one column tile (no scratch sweep) of 32 rows;
    # wider D takes 128-column tiles of 16 rows (the sizes that compile for sm_90 without spills).
    block_d = _next_pow2(d, hi=256)
    single = d <= block_d
    if not single:
        block_d = 128
    block_n, block_k = (128, 128) if INTERPRETED else (32 if single else 16, 32)
    scratch = (
        out
        if single or feat.dtype == torch.float32
        else torch.empty(nb, n, d, device=feat.device, dtype=torch.float32)
    )
    _grad_kernel[(triton.cdiv(n, block_n), nb)](
        a,
        bmat,
        feat,
        r.contiguous(),
        s.contiguous(),
        c1.contiguous(),
        scratch,
        out,
        n,
        k,
        d,
        *a.stride(),
        *bmat.stride(),
        *feat.stride(),
        EPS=EPS,
        ALPHA_R=alpha_r,
        PROJECT_U=normalized,
        DOT_BF16=_bf16_dot(feat),
        PRECISION=DOT_PRECISION,
        SINGLE_TILE=single,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=8 if single else 4,
    )
    return out


def _forward_fake(feat, normalized):
    nb, n, d = feat.shape
    m = n if uses_sample_route(n, d) else d
    loss = feat.new_empty(nb, dtype=torch.float32)
    return (
        loss,
        loss.clone(),
        feat.new_empty(nb, n, dtype=torch.float32),
        feat.new_empty(nb, d, dtype=torch.float32),
        feat.new_empty(nb, m, m, dtype=torch.float32),
    )


def _backward_fake(feat, r, s, gram, g_cos, g_ortho, normalized):
    return feat.new_empty(feat.shape)


@kernel_op("diversity_forward", _forward_fake)
def _forward_op(
    feat: torch.Tensor, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(feat, normalized)


@kernel_op("diversity_backward", _backward_fake)
def _backward_op(
    feat: torch.Tensor,
    r: torch.Tensor,
    s: torch.Tensor,
    gram: torch.Tensor,
    g_cos: torch.Tensor,
    g_ortho: torch.Tensor,
    normalized: bool,
) -> torch.Tensor:
    return _backward(feat, r, s, gram, g_cos, g_ortho, normalized)


class _DiversityGrad(torch.autograd.Function):
    """dL/dF (first order only). A Function, not a bare op call, because torch.func.grad hands the
    backward wrapped tensors, and only a Function with setup_context unwraps them for the op."""

    generate_vmap_rule = True

    @staticmethod
    def forward(feat, r, s, gram, g_cos, g_ortho, normalized):
        return _backward_op(feat, r, s, gram, g_cos, g_ortho, normalized)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("diversity")


class _Diversity(torch.autograd.Function):
    """(cos, ortho) per problem of feat (B, N, D); r, s and the Gram matrix are saved outputs.

    Forward and backward are custom ops with folding vmap rules, so vmap is generated from them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(feat, normalized):
        return _forward_op(feat, normalized)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feat, normalized = inputs
        _, _, r, s, gram = output
        ctx.normalized = normalized
        ctx.mark_non_differentiable(r, s, gram)
        ctx.save_for_backward(feat, r, s, gram)

    @staticmethod
    def backward(ctx, g_cos, g_ortho, _r, _s, _gram):
        feat, r, s, gram = ctx.saved_tensors
        zeros = torch.zeros(feat.shape[0], device=feat.device, dtype=torch.float32)
        g_cos = zeros if g_cos is None else g_cos
        g_ortho = zeros if g_ortho is None else g_ortho
        return _DiversityGrad.apply(feat, r, s, gram, g_cos, g_ortho, ctx.normalized), None


def diversity_losses(
    feats: torch.Tensor, normalized: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cos, Ortho), each (P,), of P independent problems feats (P, N, D) in one launch per kernel;
    see the module docstring for the math. The caller checks the input
    (`tldr_fast.losses.stacked_diversity_losses` is the entry point, with the torch reference).
    Composes with torch.func.grad / vmap (a vmapped batch folds into the problem dim) and runs
    inside torch.compile(fullgraph=True) as opaque ops (not under a vmap there: Dynamo cannot
    trace an autograd.Function inside vmap)."""
    cos, ortho, *_ = _Diversity.apply(traced_input(feats), bool(normalized))
    return cos, ortho
