"""What a gradient-norm call differentiates: the chosen parameters, the per-sample loss, and the
model-state checks that make per-sample gradients well defined.

Checks look only at Python values, shapes and dtypes (no host synchronisation), so they are safe
inside `torch.func` transforms and `torch.compile`; the one exception, `check_labels`, reads two
numbers from y on the host and skips itself where that is not possible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# A per-sample loss maps (logits (B, ...), targets (B, ...)) to losses (B,); sample i's loss may
# depend only on sample i (the ghost backend relies on it).
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES = ("ce",)


def cross_entropy_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """l_i = -log softmax(z_i)_{y_i}."""
    return F.cross_entropy(logits, targets, reduction="none")


def resolve_loss(loss) -> PerSampleLoss:
    if callable(loss):
        return loss
    if loss == "ce":
        return cross_entropy_per_sample
    raise ValueError(
        f"loss must be one of {LOSSES} or a callable (logits, targets) -> per-sample losses (B,), "
        f"got {loss!r}"
    )


def resolve_params(model: nn.Module, params) -> tuple[str, ...]:
    """Names (as in model.named_parameters()) of the parameters whose gradient is measured.

    params=None takes every parameter, frozen or not (the engine freezes the classifier); otherwise
    a parameter name, a parameter tensor, or a sequence mixing both. Tensors are matched by identity.
    """
    named = dict(model.named_parameters())
    if not named:
        raise ValueError(
            f"model {type(model).__name__} has no parameters: there is no gradient to measure"
        )
    if params is None:
        return tuple(named)
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    if not isinstance(params, Sequence) or not params:
        raise ValueError(
            "params must be None, a parameter name, a parameter tensor or a non-empty list of them, "
            f"got {params!r}"
        )
    name_of = {id(t): n for n, t in named.items()}
    chosen: dict[str, None] = {}
    for i, p in enumerate(params):
        if isinstance(p, str):
            if p not in named:
                known = ", ".join(list(named)[:8])
                raise ValueError(
                    f"params[{i}] = {p!r} is not a parameter name of the model; names look like: {known}"
                )
            chosen[p] = None
        elif isinstance(p, torch.Tensor):
            if id(p) not in name_of:
                raise ValueError(
                    f"params[{i}] (a tensor of shape {tuple(p.shape)}) is not a parameter of the model; "
                    "pass tensors from model.parameters() or names from model.named_parameters()"
                )
            chosen[name_of[id(p)]] = None
        else:
            raise TypeError(
                f"params[{i}] must be a parameter name or tensor, got {type(p).__name__}"
            )
    return tuple(chosen)


def check_samples_independent(model: nn.Module) -> None:
    """Refuse BatchNorm layers that normalise with batch statistics: samples then interact and a
    per-sample gradient is not defined."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            where = f"model.{name}" if name else "model"
            if module.training:
                raise ValueError(
                    f"{where} ({type(module).__name__}) is in training mode, so it mixes samples through "
                    "batch statistics and per-sample gradients are not defined; call model.eval() first"
                )
            if not module.track_running_stats:
                raise ValueError(
                    f"{where} ({type(module).__name__}) has track_running_stats=False, so it normalises "
                    "with batch statistics even in eval mode and per-sample gradients are not defined"
                )


def sum_of_squares(grads) -> torch.Tensor:
    """Per-sample squared norm of a collection of per-sample gradients, each (B, ...)."""
    return sum(g.pow(2).flatten(1).sum(1) for g in grads)


def number_of_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The size of the logits' last dimension, from a no-grad forward on one sample."""
    with torch.no_grad():
        return model(x.detach()[:1]).shape[-1]


def check_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse class labels outside [0, num_classes), naming y, the value and the range.

    Reads y's extremes on the host, so it is skipped inside torch.compile and when y is batched by
    an enclosing torch.func transform (cross-entropy itself then fails on a bad label).
    """
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(y):
        return
    classes = number_of_classes(model, x)
    low, high = int(y.min()), int(y.max())
    bad = low if low < 0 else high
    if low < 0 or high >= classes:
        raise ValueError(
            f"y must hold class labels in [0, {classes}) for the model's {classes} logits, "
            f"got {bad}"
        )
