"""Transposed convolutions, with the CPU route for few output channels.

conv_transpose(x, W) with W (C_in, C_out, kh, kw) equals fold(W^T x): per input position the
matrix product W^T x_p gives the C_out kh kw values it spreads over its kernel window, and fold
(col2im) sums the overlapping windows. On a CPU, B = 256, ATen's transposed convolution is slower
than this when C_out is 1 (32 -> 1 channels, 3 x 3, 28 x 28: 16.8 vs 8.4 ms forward; the
generator's 64 -> 1, 9 x 9, 20 -> 28 pixels: 171 vs 141 ms forward and backward) and faster from
three output channels up (that layer with 64 -> 3: 191 vs 428 ms; 32 -> 3, 3 x 3: 15 vs 22 ms;
64 -> 32: 12 vs 90 ms), hence the rule `fold_route_is_faster`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fold_route_is_faster(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether conv_transpose(x, weight) should go through `transposed_conv_by_fold`: one output
    channel, no groups, 2-D, on a CPU outside torch.compile (whose own lowering is kept)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and groups == 1
        and weight.dim() == 4
        and weight.shape[1] == 1
    )


def transposed_conv_by_fold(
    x: torch.Tensor, weight: torch.Tensor, out_size, stride, padding, dilation=(1, 1)
) -> torch.Tensor:
    """conv_transpose2d(x, weight) without bias and groups, sized out_size, as fold(W^T x)."""
    columns = torch.matmul(weight.flatten(1).t(), x.flatten(2))  # (B, C_out kh kw, H_in W_in)
    return F.fold(
        columns,
        tuple(out_size),
        weight.shape[2:],
        dilation=dilation,
        padding=padding,
        stride=stride,
    )


def transposed_convolution_to(
    grad: torch.Tensor, weight: torch.Tensor, input_shape, stride, padding, dilation, groups: int
) -> torch.Tensor:
    """d<conv(a, weight), grad>/da for a of input_shape: the transposed convolution, with the
    output_padding that restores sizes a strided convolution rounded down."""
    spatial = weight.dim() - 2
    if fold_route_is_faster(grad, weight, groups):
        return transposed_conv_by_fold(grad, weight, input_shape[-2:], stride, padding, dilation)
    output_padding = tuple(
        input_shape[-spatial + d]
        - (
            (grad.shape[-spatial + d] - 1) * stride[d]
            - 2 * padding[d]
            + dilation[d] * (weight.shape[2 + d] - 1)
            + 1
        )
        for d in range(spatial)
    )
    transposed = F.conv_transpose1d if spatial == 1 else F.conv_transpose2d
    return transposed(
        grad,
        weight,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
