"""Closed-form per-sample squared weight-gradient norms of one layer, from the layer's input a and
the gradient g of the summed loss with respect to its output (sample i's row of g is dl_i/dout_i).

- Linear, 2-D input: grad W_i = g_i a_i^T, so ||grad W_i||^2 = ||g_i||^2 ||a_i||^2; ||grad b_i||^2 = ||g_i||^2.
- Linear on sequences and Conv (positions p, unfolded patches a_p): grad W_i = sum_p g_p a_p^T, whose
  squared norm is either materialised (cost ~ P m n per sample) or taken from the Gram identity
  ||sum_p g_p a_p^T||^2 = sum_{p,q} (g_p . g_q)(a_p . a_q) (cost ~ P^2 (m + n)), whichever is cheaper.
  Grouped convolutions split channels into independent (g, a) pairs. grad b_i = sum_p g_p.
- BatchNorm in eval mode: y = w x^ + b with x^ = (x - running_mean) / sqrt(running_var + eps), so
  grad w_i = sum_positions g x^ and grad b_i = sum_positions g, per channel.
Every formula is plain tensor code, so the norms stay differentiable with respect to a and g (and
hence x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# rule(module, parameter names chosen on this module, input a, output gradient g) -> (B,)
Rule = Callable[[nn.Module, tuple[str, ...], torch.Tensor, torch.Tensor], torch.Tensor]


def summed_outer_squared_norm(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||sum_p g_p a_p^T||_F^2 for channel-major g (N, m, P) and a (N, n, P), by the cheaper route."""
    positions, m, n = g.shape[2], g.shape[1], a.shape[1]
    if positions * (m + n) < m * n:
        return (torch.bmm(g.transpose(1, 2), g) * torch.bmm(a.transpose(1, 2), a)).sum((1, 2))
    # (a g^T) rather than (g a^T): the backward then hands a contiguous gradient to the (larger) a.
    return torch.bmm(a, g.transpose(1, 2)).pow(2).sum((1, 2))


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
        windows = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        batch, channels, out_h, out_w = windows.shape[:4]
        return windows.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kh * kw, out_h * out_w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, ctx.kernel, ctx.dilation, ctx.padding, ctx.stride = inputs
        ctx.image_size = a.shape[-2:]

    @staticmethod
    def backward(ctx, grad):
        return (F.fold(grad, ctx.image_size, ctx.kernel, dilation=ctx.dilation, padding=ctx.padding,
                       stride=ctx.stride), None, None, None, None)


def unfolded_patches(a: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """F.unfold(a, kernel, dilation, padding, stride): (B, C kh kw, P) patches of a (B, C, H, W)."""
    return _Patches.apply(a, tuple(kernel), tuple(dilation), tuple(padding), tuple(stride))


def linear_rule(module: nn.Linear, names, a, g) -> torch.Tensor:
    if a.dim() == 2:
        g_sq = g.pow(2).sum(1)
        weight = g_sq * a.pow(2).sum(1) if "weight" in names else 0
        return weight + (g_sq if "bias" in names else 0)
    a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, T, features)
    weight = summed_outer_squared_norm(g.transpose(1, 2), a.transpose(1, 2)) if "weight" in names else 0
    return weight + (g.sum(1).pow(2).sum(1) if "bias" in names else 0)


def conv_rule(module: nn.Conv1d | nn.Conv2d, names, a, g) -> torch.Tensor:
    if isinstance(module, nn.Conv1d):  # as a Conv2d over a (1, L) image
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, dilation, padding, stride = ((1, *module.kernel_size), (1, *module.dilation),
                                             (0, *module.padding), (1, *module.stride))
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    batch, groups = a.shape[0], module.groups
    g = g.flatten(2)  # (B, C_out, P)
    total = g.sum(2).pow(2).sum(1) if "bias" in names else 0
    if "weight" not in names:
        return total
    patches = unfolded_patches(a, kernel, dilation, padding, stride)  # (B, C_in k, P)
    positions = patches.shape[2]
    # (B * groups, channels of one group, P); unfold orders patch channels (C_in, kh, kw), so each
    # group's input channels are contiguous.
    g = g.reshape(batch * groups, -1, positions)
    patches = patches.reshape(batch * groups, -1, positions)
    return total + summed_outer_squared_norm(g, patches).view(batch, groups).sum(1)


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, names, a, g) -> torch.Tensor:
    batch, channels = a.shape[0], a.shape[1]
    g = g.reshape(batch, channels, -1)
    g_sum = g.sum(2)
    total = g_sum.pow(2).sum(1) if "bias" in names else 0
    if "weight" not in names:
        return total
    # sum_p g_p x^_p = (sum_p g_p a_p - running_mean sum_p g_p) / sqrt(running_var + eps): one pass
    # over the activations instead of normalising them first.
    weight = ((g * a.reshape(batch, channels, -1)).sum(2) - module.running_mean * g_sum) * torch.rsqrt(
        module.running_var + module.eps)
    return total + weight.pow(2).sum(1)


def explicit_zero_padding(conv: nn.Conv1d | nn.Conv2d) -> bool:
    """Zero padding given as numbers (not "same"/"valid" or another padding mode): what the
    unfold and transposed-convolution formulas assume."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def closed_form_rule(module: nn.Module) -> Rule | None:
    """The closed-form rule for this exact module type, or None (the caller then vmaps the module).

    Exact types only: a subclass may override forward and break the formula.
    """
    kind = type(module)
    if kind is nn.Linear:
        return linear_rule
    if kind in (nn.Conv1d, nn.Conv2d):
        if explicit_zero_padding(module):
            return conv_rule
        return None
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return batch_norm_rule
    return None
