"""Ghost rules for the normalisation layers' affine parameters, and the decomposed forwards that
keep their d/dx exact under torch.func.vmap.

Each layer computes y = w * x^ + b from a normalised input x^, so per sample
grad w_i = sum over the positions w is broadcast over of g x^, and grad b_i = sum of g there:
- LayerNorm(ns): x^ = (a - mean) / sqrt(var + eps) over the trailing dims ns, w and b of shape ns;
- RMSNorm(ns): x^ = a / sqrt(mean(a^2) + eps) over ns (eps None: the dtype's machine epsilon), w only;
- GroupNorm(G, C): x^ normalised over each sample's group of C / G channels and all positions;
- InstanceNorm (affine): x^ normalised per sample and channel over positions, or with the running
  statistics when they are tracked and the module is in eval mode (train mode with tracked
  statistics is refused before any backend runs: the forward would update them).
x^ is written out here in plain tensor ops, so its second derivatives are autograd's own.

`decomposed_normalisations(module)` makes LayerNorm and InstanceNorm modules compute that same
y = w x^ + b while a vmap backend runs: differentiating torch.func.vmap(grad with respect to the
norm's weight) with respect to the input goes wrong for ATen's fused layer_norm and instance-norm
kernels (d/dx off by tens of percent, values exact; pinned in tests/test_grad_norm_torch_func.py),
while the written-out form is exact.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from tldr_fast.grad_norm.registry import register_norm_rule
from tldr_fast.module_hooks import temporary_forward_hooks

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _standardised(a: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = a.mean(dims, keepdim=True)
    centred = a - mean
    return centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)


def normalised_input(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """x^ of a LayerNorm, RMSNorm, GroupNorm or InstanceNorm for a batched input a (B, ...)."""
    if isinstance(module, nn.LayerNorm):
        return _standardised(
            a, tuple(range(a.dim() - len(module.normalized_shape), a.dim())), module.eps
        )
    if isinstance(module, nn.RMSNorm):
        dims = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
        eps = torch.finfo(a.dtype).eps if module.eps is None else module.eps
        return a * torch.rsqrt(a.pow(2).mean(dims, keepdim=True) + eps)
    if isinstance(module, nn.GroupNorm):
        grouped = a.reshape(a.shape[0], module.num_groups, -1)
        return _standardised(grouped, (2,), module.eps).view_as(a)
    if module.track_running_stats and not module.training:  # InstanceNorm with running statistics
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return (a - module.running_mean.view(shape)) * torch.rsqrt(
            module.running_var.view(shape) + module.eps
        )
    return _standardised(a, tuple(range(2, a.dim())), module.eps)


def _parameter_shape_dims(module: nn.Module, a: torch.Tensor) -> tuple[int, ...]:
    """The dims of a (B, ...) that the affine parameters span."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
    return (1,)


def _sum_over_positions(t: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    dims = tuple(d for d in range(1, t.dim()) if d not in keep)
    return t.sum(dims) if dims else t


def affine_norm_rule(module: nn.Module, names, a, g) -> torch.Tensor:
    keep = _parameter_shape_dims(module, a)
    total = 0
    if "weight" in names:
        total = _sum_over_positions(g * normalised_input(module, a), keep).pow(2).flatten(1).sum(1)
    if "bias" in names:
        total = total + _sum_over_positions(g, keep).pow(2).flatten(1).sum(1)
    return total


register_norm_rule(nn.LayerNorm, nn.RMSNorm, layout="features_last")(affine_norm_rule)
register_norm_rule(nn.GroupNorm, *_INSTANCE_NORMS)(affine_norm_rule)


def _affine_output(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """w x^ + b, the module's forward written out."""
    out = normalised_input(module, a)
    shape = (
        module.normalized_shape
        if isinstance(module, nn.LayerNorm)
        else (-1,) + (1,) * (a.dim() - 2)
    )
    if module.weight is not None:
        out = out * module.weight.view(shape)
    if module.bias is not None:
        out = out + module.bias.view(shape)
    return out


def _decomposed(module, args, kwargs, output):
    return _affine_output(module, args[0])


@contextmanager
def decomposed_normalisations(root: nn.Module):
    """Within the block, every LayerNorm and InstanceNorm under root (root included) returns its
    output computed by `_affine_output` (before any of the module's own forward hooks run)."""
    modules = [m for m in root.modules() if isinstance(m, (nn.LayerNorm, *_INSTANCE_NORMS))]
    with temporary_forward_hooks(modules, lambda i: _decomposed, first=True):
        yield
