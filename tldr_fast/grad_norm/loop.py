"""The `loop` backend, the oracle: one sample at a time with plain autograd.

For each sample i, g_i = autograd.grad(l_i, theta, create_graph=True) on fresh leaf copies of the
chosen parameters, so the result is differentiable with respect to x (not with respect to the
model's parameters) and shares no code path with `torch.func`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from tldr_fast.grad_norm.selection import PerSampleLoss


def sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: PerSampleLoss,
    names: tuple[str, ...],
):
    """Yield, for each sample i, the tuple of gradients of l_i with respect to the chosen parameters."""
    named = dict(model.named_parameters())
    with torch.enable_grad():
        for i in range(x.shape[0]):
            leaves = {n: named[n].detach().requires_grad_() for n in names}
            logits = functional_call(model, leaves, (x[i : i + 1],))
            loss = loss_fn(logits, y[i : i + 1]).sum()
            yield torch.autograd.grad(
                loss,
                tuple(leaves.values()),
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )


def loop_squared_norms(model, x, y, loss_fn, names) -> torch.Tensor:
    """(B,) squared per-sample gradient norms, one autograd call per sample."""
    return torch.stack(
        [
            sum(g.pow(2).sum() for g in grads)
            for grads in sample_gradients(model, x, y, loss_fn, names)
        ]
    )


def loop_batch_gradient(model, x, y, loss_fn, names) -> tuple[torch.Tensor, ...]:
    """grad_theta (1/B) sum_i l_i accumulated sample by sample."""
    total = None
    for grads in sample_gradients(model, x, y, loss_fn, names):
        total = grads if total is None else tuple(a + b for a, b in zip(total, grads, strict=True))
    return tuple(t / x.shape[0] for t in total)
