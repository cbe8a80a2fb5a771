"""Ghost rule for nn.Conv1d / nn.Conv2d with explicit zero padding (any stride, dilation, groups).

Positions p with unfolded patches a_p: grad W_i = sum_p g_p a_p^T and grad b_i = sum_p g_p. The
weight term's squared norm is materialised (cost ~ P m n per sample) or taken from the Gram identity
(cost ~ P^2 (m + n)), whichever is cheaper (see `outer`); grouped convolutions split channels into
independent (g, a) pairs. On a CPU outside torch.compile there are two more routes: the materialised
one differentiated through two convolutions with the batch folded into the groups
(`per_sample_conv_weight_gradients`), and the Gram identity with the patches' Gram taken from the
input's own (`patch_gram_from_input`, cost ~ (H W)^2 C_in + P^2 (m + taps)). Other padding modes
("same", "valid" as strings, circular, reflect) have no rule here and are vmapped per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tldr_fast.grad_norm.outer import gram_squared_norm, materialised_squared_norm
from tldr_fast.grad_norm.registry import register_norm_rule
from tldr_fast.transposed_conv import transposed_convolution_to


class _Patches(torch.autograd.Function):
    """F.unfold with a faster forward and backward on CPU.

    F.unfold's im2col loops over samples and is one to two orders of magnitude slower (seconds at
    batch 256 on PaperCNN's first layer) than one copy of a Tensor.unfold view; that view's own
    backward (unfold_backward, twice) is about three times slower than F.fold, which is the
    adjoint used here.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, kernel, dilation, padding, stride):
        (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
        a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
        # windows spanning the dilated kernel, then every dilation-th tap: (B, C, Ho, Wo, kh, kw)
        windows = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[
            ..., ::dh, ::dw
        ]
        batch, channels, out_h, out_w = windows.shape[:4]
        return windows.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kh * kw, out_h * out_w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, ctx.kernel, ctx.dilation, ctx.padding, ctx.stride = inputs
        ctx.image_size = a.shape[-2:]

    @staticmethod
    def backward(ctx, grad):
        return (
            F.fold(
                grad,
                ctx.image_size,
                ctx.kernel,
                dilation=ctx.dilation,
                padding=ctx.padding,
                stride=ctx.stride,
            ),
            None,
            None,
            None,
            None,
        )


def unfolded_patches(a: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """F.unfold(a, kernel, dilation, padding, stride): (B, C kh kw, P) patches of a (B, C, H, W)."""
    return _Patches.apply(a, tuple(kernel), tuple(dilation), tuple(padding), tuple(stride))


class _PerSampleConvWeightGradients(torch.autograd.Function):
    """(a, g) -> G, G[i * groups + j] = sum_p g_p a_p^T over the patches a_p of sample i's group j,
    laid out as the convolution's weight (C_out/groups, C_in/groups kh kw).

    Forward by patches and one batched product. Backward with the batch folded into the groups of
    two convolutions whose weights are each sample's incoming gradient Gbar_i: dg_i = conv(a_i, Gbar_i),
    da_i = conv_transpose(g_i, Gbar_i). On a CPU that is 2-4x faster than autograd's route through
    the product and the patches (F.fold runs sample by sample; products over an inner dimension of
    kh kw C_in are slow when it is small) and keeps no patches for the backward. Both convolutions
    are differentiable, so higher derivatives stay exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, g, kernel, dilation, padding, stride, groups):
        batch, positions = a.shape[0], g.shape[2] * g.shape[3]
        patches = unfolded_patches(a, kernel, dilation, padding, stride).reshape(
            batch * groups, -1, positions
        )
        return torch.bmm(g.reshape(batch * groups, -1, positions), patches.transpose(1, 2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, g, ctx.kernel, ctx.dilation, ctx.padding, ctx.stride, ctx.groups = inputs
        ctx.save_for_backward(a, g)

    @staticmethod
    def backward(ctx, grad):
        a, g = ctx.saved_tensors
        (batch, c_in), c_out, groups = a.shape[:2], g.shape[1], ctx.groups
        weight = grad.reshape(batch * c_out, c_in // groups, *ctx.kernel)
        grad_a = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_a = transposed_convolution_to(
                g.reshape(1, batch * c_out, *g.shape[2:]),
                weight,
                (1, batch * c_in, *a.shape[2:]),
                ctx.stride,
                ctx.padding,
                ctx.dilation,
                batch * groups,
            ).view_as(a)
        if ctx.needs_input_grad[1]:
            grad_g = F.conv2d(
                a.reshape(1, batch * c_in, *a.shape[2:]),
                weight,
                None,
                ctx.stride,
                ctx.padding,
                ctx.dilation,
                batch * groups,
            ).view_as(g)
        return grad_a, grad_g, None, None, None, None, None


def per_sample_conv_weight_gradients(
    a: torch.Tensor, g: torch.Tensor, kernel, dilation, padding, stride, groups: int
) -> torch.Tensor:
    """(B groups, C_out/groups, C_in/groups kh kw) per-sample weight gradients of a 2-D convolution
    from its input a (B, C_in, H, W) and output gradient g (B, C_out, Ho, Wo)."""
    return _PerSampleConvWeightGradients.apply(
        a, g, tuple(kernel), tuple(dilation), tuple(padding), tuple(stride), groups
    )


def _tap_slices(kernel, dilation, stride, out_size):
    """Per kernel tap t, the slices (rows, columns) of the padded image that tap reads for every
    output position: s p + d t."""
    (kh, kw), (dh, dw), (sh, sw), (out_h, out_w) = kernel, dilation, stride, out_size
    return [
        (
            slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh),
            slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw),
        )
        for i in range(kh)
        for j in range(kw)
    ]


class _SummedTapSlices(torch.autograd.Function):
    """K (B, H, W, H, W) -> sum over taps t of Kpad[s p + d t, s q + d t] (B, Ho, Wo, Ho, Wo), Kpad
    being K zero-padded on every spatial side. The backward adds the incoming gradient into each
    tap's slice of one zero buffer (autograd's slicing would fill a zero buffer per tap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gram, kernel, dilation, padding, stride, out_size):
        padded = F.pad(gram, (padding[1], padding[1], padding[0], padding[0]) * 2)
        total = None
        for r, c in _tap_slices(kernel, dilation, stride, out_size):
            total = padded[:, r, c, r, c] if total is None else total + padded[:, r, c, r, c]
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        gram, ctx.kernel, ctx.dilation, ctx.padding, ctx.stride, ctx.out_size = inputs
        ctx.image_size = gram.shape[1:3]

    @staticmethod
    def backward(ctx, grad):
        (ph, pw), (height, width) = ctx.padding, ctx.image_size
        padded = grad.new_zeros(grad.shape[0], *(height + 2 * ph, width + 2 * pw) * 2)
        for r, c in _tap_slices(ctx.kernel, ctx.dilation, ctx.stride, ctx.out_size):
            padded[:, r, c, r, c] += grad
        rows, columns = slice(ph, ph + height), slice(pw, pw + width)
        return padded[:, rows, columns, rows, columns], None, None, None, None, None


def patch_gram_from_input(a: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """(B, P, P) Gram matrices A^T A of the patches A = F.unfold(a, ...) of a (B, C, H, W), from
    the input's own Gram K = X^T X over its H W positions: (a_p . a_q) = sum over taps t of
    K[s p + d t - pad, s q + d t - pad] (zero outside the image), i.e. kh kw strided slices of the
    zero-padded K summed, instead of P^2 C kh kw multiply-adds over the patches."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    batch, channels, height, width = a.shape
    out_size = (
        (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
        (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1,
    )
    rows = a.reshape(batch, channels, height * width)
    gram = torch.bmm(rows.transpose(1, 2), rows).view(batch, height, width, height, width)
    summed = _SummedTapSlices.apply(
        gram, tuple(kernel), tuple(dilation), tuple(padding), tuple(stride), out_size
    )
    return summed.reshape(batch, out_size[0] * out_size[1], out_size[0] * out_size[1])


# One strided shifted addition of patch_gram_from_input costs about this many multiply-adds of a
# batched product on a CPU (measured at B = 256 on 7 x 7 and 14 x 14 images with 32-64 channels).
_SHIFTED_ADD_COST = 40


def _conv_route(
    positions: int, input_positions: int, m: int, channels: int, taps: int, cpu_eager: bool
) -> str:
    """The cheapest of materialising (P m n multiply-adds, n = channels taps), the Gram identity over
    patches (P^2 (m + n)) and, on a CPU outside torch.compile, over the input's Gram
    (H^2 W^2 channels + P^2 (m + taps x the shifted-add cost))."""
    n = channels * taps
    costs = {"materialise": positions * m * n, "patch_gram": positions**2 * (m + n)}
    if cpu_eager:
        costs["input_gram"] = input_positions**2 * channels + positions**2 * (
            m + _SHIFTED_ADD_COST * taps
        )
    return min(costs, key=costs.get)


def explicit_zero_padding(conv: nn.Conv1d | nn.Conv2d) -> bool:
    """Zero padding given as numbers (not "same"/"valid" or another padding mode): what the
    unfold and transposed-convolution formulas assume."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


@register_norm_rule(nn.Conv1d, nn.Conv2d, applies=explicit_zero_padding)
def conv_rule(module: nn.Conv1d | nn.Conv2d, names, a, g) -> torch.Tensor:
    if isinstance(module, nn.Conv1d):  # as a Conv2d over a (1, L) image
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, dilation, padding, stride = (
            (1, *module.kernel_size),
            (1, *module.dilation),
            (0, *module.padding),
            (1, *module.stride),
        )
    else:
        kernel, dilation, padding, stride = (
            module.kernel_size,
            module.dilation,
            module.padding,
            module.stride,
        )
    (batch, c_in, height, width), c_out, groups = a.shape, g.shape[1], module.groups
    total = g.flatten(2).sum(2).pow(2).sum(1) if "bias" in names else 0
    if "weight" not in names:
        return total
    positions = g.shape[2] * g.shape[3]
    cpu_eager = a.device.type == "cpu" and not torch.compiler.is_compiling()
    route = _conv_route(
        positions, height * width, c_out // groups, c_in // groups, kernel[0] * kernel[1], cpu_eager
    )
    if route == "materialise" and cpu_eager:
        weight_grads = per_sample_conv_weight_gradients(
            a, g, kernel, dilation, padding, stride, groups
        )
        # Not linalg.vector_norm(...).square() (one product fewer in the backward): its second
        # derivative is NaN where a sample's gradient is exactly zero.
        return total + weight_grads.pow(2).sum((1, 2)).view(batch, groups).sum(1)
    # (B * groups, channels of one group, P); unfold orders patch channels (C_in, kh, kw), so each
    # group's input channels are contiguous.
    g = g.reshape(batch * groups, c_out // groups, positions)
    if route == "input_gram":
        a_gram = patch_gram_from_input(
            a.reshape(batch * groups, c_in // groups, height, width),
            kernel,
            dilation,
            padding,
            stride,
        )
        squared = gram_squared_norm(g, a_gram)
    else:
        patches = unfolded_patches(a, kernel, dilation, padding, stride).reshape(
            batch * groups, -1, positions
        )
        squared = (
            gram_squared_norm(g, torch.bmm(patches.transpose(1, 2), patches))
            if route == "patch_gram"
            else materialised_squared_norm(g, patches)
        )
    return total + squared.view(batch, groups).sum(1)
