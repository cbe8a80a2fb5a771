"""Fused total-variation and pixel-range losses of an image batch x (N, C, H, W), one read of x.

    TV  = (1/N) sum_{i,c,h,w} (x_{h+1,w} - x_{h,w})^2 + (x_{h,w+1} - x_{h,w})^2
    Pix = (1/N) sum_{i,c,h,w} relu(-x) + relu(x - 1)

(the definitions of `tldr_fast.losses.total_variation` / `pixel_range`, which are the reference and
the CPU path). Gradient for loss weights (g_tv, g_pix), with forward differences dx, dy and the
backward ones at the same pixel (zero outside the image):

    dL/dx_{h,w} = (g_tv / N) 2 (dx_{h,w-1} - dx_{h,w} + dy_{h-1,w} - dy_{h,w})
                  + (g_pix / N) ([x > 1] - [x < 0])

One kernel does both: each program loads a block of planes once (the neighbour loads hit L1) and
writes per-plane partial sums and, when asked, the gradient. The autograd backward is one more pass
(read x, write the gradient) because the weights only arrive there; `weighted_tv_pixel` takes the
weights up front and writes loss and gradient in the forward pass.
"""

from __future__ import annotations

import torch

from tldr_fast.kernels.runtime import INTERPRETED, kernel_op, refuse_double_backward, traced_input

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

_TILE_ELEMENTS = 1 << 14 if INTERPRETED else 4096  # elements per program


if triton is not None:

    @triton.jit
    def _tv_pixel_kernel(
        X,
        part_tv,
        part_pix,
        grad,
        w_tv_ptr,
        w_pix_ptr,
        n_planes,
        HW,
        H,
        W,
        planes_per_group,
        WRITE_LOSS: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        """Per-plane partial TV / Pix sums of one [planes, pixels] tile and/or its gradient.

        HW (= H * W) is its own argument so that Triton's divisible-by-16 specialisation of integer
        arguments proves plane starts aligned (28 x 28 = 784 is, 28 is not): vectorised loads.
        """
        pid_p = tl.program_id(0)
        pid_hw = tl.program_id(1)
        hw = HW
        planes = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        k = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        h = k // W
        w = k % W
        ok = (planes < n_planes)[:, None] & (k < hw)[None, :]
        ptrs = X + planes.to(tl.int64)[:, None] * hw + k[None, :]
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        right = ok & (w < W - 1)[None, :]
        down = ok & (h < H - 1)[None, :]
        dx = tl.where(right, tl.load(ptrs + 1, mask=right, other=0.0).to(tl.float32) - x, 0.0)
        dy = tl.where(down, tl.load(ptrs + W, mask=down, other=0.0).to(tl.float32) - x, 0.0)
        if WRITE_LOSS:
            # propagate_nan keeps a NaN pixel visible in Pix too (relu(NaN) = NaN in torch).
            outside = tl.maximum(-x, 0.0, propagate_nan=tl.PropagateNan.ALL) + tl.maximum(
                x - 1.0, 0.0, propagate_nan=tl.PropagateNan.ALL
            )
            n_hw = tl.num_programs(1)
            dst = planes * n_hw + pid_hw
            tl.store(part_tv + dst, tl.sum(dx * dx + dy * dy, 1), mask=planes < n_planes)
            tl.store(part_pix + dst, tl.sum(outside, 1), mask=planes < n_planes)
        if WRITE_GRAD:
            left = ok & (w > 0)[None, :]
            up = ok & (h > 0)[None, :]
            dl = tl.where(left, x - tl.load(ptrs - 1, mask=left, other=0.0).to(tl.float32), 0.0)
            du = tl.where(up, x - tl.load(ptrs - W, mask=up, other=0.0).to(tl.float32), 0.0)
            group = planes // planes_per_group
            w_tv = tl.load(w_tv_ptr + group, mask=planes < n_planes, other=0.0)
            w_pix = tl.load(w_pix_ptr + group, mask=planes < n_planes, other=0.0)
            g = 2.0 * w_tv[:, None] * (dl - dx + du - dy) + w_pix[:, None] * (
                tl.where(x > 1.0, 1.0, 0.0) - tl.where(x < 0.0, 1.0, 0.0)
            )
            tl.store(
                grad + planes.to(tl.int64)[:, None] * hw + k[None, :],
                g.to(grad.dtype.element_ty),
                mask=ok,
            )


def _launch(x: torch.Tensor, w_tv=None, w_pix=None, write_loss: bool = True):
    """Run the kernel on x (G, N, C, H, W); returns ((tv, pix) per group or None, grad or None)."""
    groups, n, c, h, w = x.shape
    x = x.contiguous()
    n_planes, hw = groups * n * c, h * w
    block_hw = min(triton.next_power_of_2(hw), _TILE_ELEMENTS)
    block_p = max(1, _TILE_ELEMENTS // block_hw)
    grid = (triton.cdiv(n_planes, block_p), triton.cdiv(hw, block_hw))
    write_grad = w_tv is not None
    part_tv = torch.empty(n_planes, grid[1], device=x.device, dtype=torch.float32)
    part_pix = torch.empty_like(part_tv)
    grad = torch.empty(x.shape, device=x.device, dtype=x.dtype) if write_grad else part_tv
    if write_grad:
        w_tv, w_pix = (weight.float().div(n).contiguous() for weight in (w_tv, w_pix))
    else:
        w_tv = w_pix = part_tv
    _tv_pixel_kernel[grid](
        x,
        part_tv,
        part_pix,
        grad,
        w_tv,
        w_pix,
        n_planes,
        hw,
        h,
        w,
        n * c,
        WRITE_LOSS=write_loss,
        WRITE_GRAD=write_grad,
        BLOCK_P=block_p,
        BLOCK_HW=block_hw,
        num_warps=8,
    )
    losses = None
    if write_loss:
        losses = tuple(p.view(groups, -1).sum(-1) / n for p in (part_tv, part_pix))
    return losses, (grad if write_grad else None)


def _losses_fake(x):
    loss = x.new_empty(x.shape[0], dtype=torch.float32)
    return loss, loss.clone()


@kernel_op("tv_pixel_forward", _losses_fake)
def _forward_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x)[0]


@kernel_op("tv_pixel_backward", lambda x, g_tv, g_pix: x.new_empty(x.shape))
def _backward_op(x: torch.Tensor, g_tv: torch.Tensor, g_pix: torch.Tensor) -> torch.Tensor:
    return _launch(x, g_tv, g_pix, write_loss=False)[1]


def _weighted_fake(x, w_tv, w_pix):
    return (*_losses_fake(x), x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape))


@kernel_op("tv_pixel_weighted", _weighted_fake)
def _weighted_op(
    x: torch.Tensor, w_tv: torch.Tensor, w_pix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (tv, pix), grad = _launch(x, w_tv, w_pix)
    return w_tv * tv + w_pix * pix, tv, pix, grad


class _TVPixelGrad(torch.autograd.Function):
    """dL/dx (first order only); a Function so that torch.func.grad unwraps its inputs for the op."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, g_tv, g_pix):
        return _backward_op(x, g_tv, g_pix)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("TV/pixel")


class _TVPixel(torch.autograd.Function):
    """(tv, pix) per group of x (G, N, C, H, W); vmap is generated from the ops' folding rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _forward_op(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g_tv, g_pix):
        (x,) = ctx.saved_tensors
        zeros = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        g_tv = zeros if g_tv is None else g_tv
        g_pix = zeros if g_pix is None else g_pix
        return _TVPixelGrad.apply(x, g_tv, g_pix)


class _WeightedTVPixel(torch.autograd.Function):
    """w_tv TV + w_pix Pix per group, with the gradient written in the same pass as the loss."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_tv, w_pix):
        return _weighted_op(x, w_tv, w_pix)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, tv, pix, grad = output
        ctx.mark_non_differentiable(tv, pix, grad)
        ctx.save_for_backward(grad)

    @staticmethod
    def backward(ctx, g_loss, _tv, _pix, _grad):
        (grad,) = ctx.saved_tensors
        scale = g_loss.to(grad.dtype).view(-1, *(1,) * (grad.dim() - 1))
        return grad * scale, None, None


def tv_pixel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(TV, Pix), each (G,) float32, of G independent image batches x (G, N, C, H, W) in one launch;
    see the module docstring for the math. The caller checks the input
    (`tldr_fast.losses.stacked_tv_pixel` is the entry point, with the torch reference). Composes
    with torch.func.grad / vmap and runs inside torch.compile(fullgraph=True) as opaque ops."""
    return _TVPixel.apply(traced_input(x))


def weighted_tv_pixel(x: torch.Tensor, w_tv: torch.Tensor, w_pix: torch.Tensor):
    """(w_tv TV + w_pix Pix, TV, Pix), each (G,), of x (G, N, C, H, W), with the gradient computed
    in the forward pass: for a fixed-weight objective this reads x once and writes dL/dx once (the
    backward only scales it by the incoming gradient). w_tv, w_pix: (G,) or (1,) float32 tensors;
    TV and Pix are returned detached, for logging."""
    return _WeightedTVPixel.apply(traced_input(x), w_tv, w_pix)[:3]
