"""The `vmap` backend: torch.func.vmap(grad) over functional_call, for any model.

Sample i is run as a batch of one, so per-sample gradients g_i = grad_theta l(f(x_i), y_i) come out
stacked (B, *theta.shape) and ||g_i||^2 sums over them. `chunk_size` bounds how many samples'
gradients are materialised at once. Works under outer torch.func transforms and torch.compile. LayerNorm and InstanceNorm run in their
written-out form here (`normalization.decomposed_normalisations`), as ATen's fused kernels give a
wrong d/dx under this transform composition; models with an RNN are refused (no vmap support).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tldr_fast.grad_norm.normalization import decomposed_normalisations
from tldr_fast.grad_norm.refusals import vmap_limit
from tldr_fast.grad_norm.selection import PerSampleLoss, sum_of_squares


def chosen_parameters(model: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def vmap_squared_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: PerSampleLoss,
    names: tuple[str, ...],
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(B,) squared per-sample gradient norms of the chosen parameters."""
    reason = vmap_limit(model)
    if reason is not None:
        raise ValueError(reason)

    def sample_loss(theta, xi, yi):
        return loss_fn(functional_call(model, theta, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_sample = vmap(
        grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness="different"
    )
    with decomposed_normalisations(model):
        return sum_of_squares(per_sample(chosen_parameters(model, names), x, y).values())


def batch_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: PerSampleLoss,
    names: tuple[str, ...],
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """grad_theta (1/B) sum_i l_i, summed chunk by chunk when chunk_size is given."""

    def summed_loss(theta, xc, yc):
        return loss_fn(functional_call(model, theta, (xc,)), yc).sum()

    theta = chosen_parameters(model, names)
    step = chunk_size or x.shape[0]
    total = None
    for start in range(0, x.shape[0], step):
        g = grad(summed_loss)(theta, x[start : start + step], y[start : start + step])
        total = g if total is None else {n: total[n] + g[n] for n in g}
    return tuple(t / x.shape[0] for t in total.values())
