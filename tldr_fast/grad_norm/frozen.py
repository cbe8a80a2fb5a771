"""Probed outputs of frozen layers by routes whose double backward is cheaper than autograd's.

The ghost backend adds a zero probe to each measured layer's output, y + probe, and differentiates
twice: once to get g = dl/dy with its graph, once more through that graph to x. For some layer
types autograd's second derivative does work eval mode or frozen weights never use, so here
`probed_output(module, a, y, probe)` returns the same value y + probe by a cheaper route:
- eval BatchNorm: the per-channel affine map a * s + t, s = w / sqrt(running_var + eps),
  t = b - running_mean * s (ATen's batch-norm double backward also forms batch-statistics terms
  that cost about ten times a multiply on CPU);
- Conv1d/2d with frozen weights: a custom autograd Function whose backward is the transposed
  convolution of the output gradient, so the double backward is one convolution of the incoming
  gradient (ATen's convolution double backward also forms the weight gradient, frozen or not).
Modules with weights that require grad keep autograd's route, so d/dtheta stays exact, and so
does compiled code (see `probed_output`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tldr_fast.grad_norm.conv import explicit_zero_padding
from tldr_fast.transposed_conv import transposed_convolution_to

# probed_output(module, input a, module output y, probe) -> y + probe
ProbedOutput = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def eval_batch_norm(module: nn.modules.batchnorm._BatchNorm, a: torch.Tensor) -> torch.Tensor:
    """a * s + t with s = w / sqrt(running_var + eps), t = b - running_mean * s, per channel."""
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return torch.addcmul(shift.view(shape), a, scale.view(shape))


def _probed_batch_norm(module, a, y, probe):
    # The module's own y is left unused (dead code under torch.compile).
    return eval_batch_norm(module, a) + probe


class _FrozenConvOutput(torch.autograd.Function):
    """(a, y, probe) -> y + probe, where y = conv(a) with frozen weights was computed by the module.

    d/da is the transposed convolution; y is a value only (its dependence on a is this Function's).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, y, probe, module):
        return y + probe

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, _, _, module = inputs
        ctx.module, ctx.input_shape = module, a.shape

    @staticmethod
    def backward(ctx, grad):
        # The inner derivative (to the probes) never needs the first layer's input gradient.
        grad_a = (
            conv_input_gradient(ctx.module, grad, ctx.input_shape)
            if ctx.needs_input_grad[0]
            else None
        )
        return grad_a, None, grad, None


def conv_input_gradient(
    module: nn.Conv1d | nn.Conv2d, grad: torch.Tensor, input_shape
) -> torch.Tensor:
    """d<module(a), grad>/da as a transposed convolution."""
    return transposed_convolution_to(
        grad,
        module.weight,
        input_shape,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
    )


def _probed_frozen_conv(module, a, y, probe):
    return _FrozenConvOutput.apply(a, y.detach(), probe, module)


def probed_output(module: nn.Module) -> ProbedOutput | None:
    """The cheaper route for this exact module type, or None to keep y + probe through autograd."""
    kind = type(module)
    if kind in _BATCH_NORMS and not module.training:
        return _probed_batch_norm
    frozen = not any(p.requires_grad for p in module.parameters())
    # Under torch.compile the Function's backward is traced as a leaf of the outer derivative,
    # which then loses the path through g (measured: d/dx wrong); compiled code keeps autograd's.
    if (
        kind in (nn.Conv1d, nn.Conv2d)
        and frozen
        and explicit_zero_padding(module)
        and not torch.compiler.is_compiling()
    ):
        return _probed_frozen_conv
    return None
