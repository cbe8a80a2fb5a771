"""Per-sample weight-gradient norms, differentiable with respect to the input.

    n_i = || grad_theta l(f_theta(x_i), y_i) ||_2          (mode="per_sample", shape (B,))
    n   = || grad_theta (1/B) sum_i l(f_theta(x_i), y_i) || (mode="batch", the TLDR authors' code, 0-d)

over the chosen parameters theta (all of them by default, frozen or not). The result keeps the
graph to x (create_graph semantics), so d/dx of any function of it is a double backward. Backends:
- `ghost`: one batched backward to every layer's output, then each layer's registered closed-form
  rule (`registry.register_norm_rule`; Linear, Conv1d/2d, eval BatchNorm, LayerNorm, RMSNorm,
  GroupNorm, InstanceNorm, Embedding built in), other modules through vmap on that module alone;
  refuses, naming the layer and the reason, a model the decomposition cannot split (`plan`);
- `vmap`: torch.func.vmap(grad) over functional_call, any model torch.func can run;
- `loop`: one sample at a time with plain autograd, the oracle;
- `auto`: `ghost`, except that a rule whose result fails its check is replaced by that layer's
  vmap, and a model ghost refuses goes to `vmap` whole.
Models the vectorised backends cannot run (backward hooks, RNNs, ...) are refused by name with the
alternative (`refusals`). Nothing is left on the model: no `.grad`, no hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Importing the rule modules registers the built-in rules.
from tldr_fast.grad_norm import batch_norm, conv, embedding, linear, normalization  # noqa: F401
from tldr_fast.grad_norm.ghost import (
    ForwardWithExtras,
    ghost_squared_norms,
    ghost_squared_norms_and_outputs,
)
from tldr_fast.grad_norm.loop import loop_batch_gradient, loop_squared_norms
from tldr_fast.grad_norm.plan import GhostUnsupported, plan_layers
from tldr_fast.grad_norm.refusals import check_backend_limits
from tldr_fast.grad_norm.registry import NormRule, Rule, register_norm_rule, registered_types
from tldr_fast.grad_norm.selection import (
    LOSSES,
    check_labels,
    check_samples_independent,
    resolve_loss,
    resolve_params,
)
from tldr_fast.grad_norm.vmap import batch_gradient, vmap_squared_norms
from tldr_fast.grad_norm.wrappers import unwrapped
from tldr_fast.validation import check_positive_int

BACKENDS = ("auto", "ghost", "vmap", "loop")
MODES = ("per_sample", "batch")

__all__ = [
    "BACKENDS",
    "LOSSES",
    "MODES",
    "NormRule",
    "Route",
    "Rule",
    "batch_mean_gradient",
    "explain_grad_norm",
    "per_sample_grad_norm",
    "per_sample_grad_norm_and_forward",
    "register_norm_rule",
    "registered_types",
    "safe_sqrt",
]


def safe_sqrt(squared: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 (not NaN) where the argument is 0 (or rounds below it); NaN stays NaN."""
    squared = squared.clamp_min(0)
    zero = squared == 0
    return torch.where(
        zero, torch.zeros_like(squared), torch.where(zero, torch.ones_like(squared), squared).sqrt()
    )


def per_sample_grad_norm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss="ce",
    params=None,
    backend: str = "auto",
    mode: str = "per_sample",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Norms of per-sample (or batch-mean) loss gradients with respect to the model's parameters.

    model: in eval mode wherever BatchNorm is present (training-mode BatchNorm mixes samples); an
        Opacus GradSampleModule is measured on the module it wraps.
    x: (B, ...) input; y: (B,) integer class labels in [0, num_classes) for loss="ce", else
        whatever `loss` takes. NaN or Inf in a sample gives that sample a NaN norm.
    loss: "ce" (cross-entropy) or a callable (logits, y) -> per-sample losses (B,).
    params: None for every parameter, or names from model.named_parameters() and/or the parameter
        tensors themselves (matched by identity).
    backend: "auto" | "ghost" | "vmap" | "loop" (see the module docstring; `explain_grad_norm`
        says which rule serves each layer).
    mode: "per_sample" returns (B,) norms; "batch" returns the 0-d norm of the batch-mean gradient.
    chunk_size: at most this many samples per vectorised pass (bounds memory); the loop backend
        ignores it.
    """
    with unwrapped(model, params) as (model, params), _twice_differentiable_attention():
        names = _validate(model, x, y, loss, params, backend, mode, chunk_size)
        loss_fn = resolve_loss(loss)
        if mode == "batch":
            return safe_sqrt(
                sum(
                    g.pow(2).sum()
                    for g in _batch_mean_gradient(model, x, y, loss_fn, names, backend, chunk_size)
                )
            )
        return safe_sqrt(_squared_norms(model, x, y, loss_fn, names, backend, chunk_size))


def _squared_norms(model, x, y, loss_fn, names, backend, chunk_size) -> torch.Tensor:
    if backend == "loop":
        return loop_squared_norms(model, x, y, loss_fn, names)
    if backend == "vmap":
        return vmap_squared_norms(model, x, y, loss_fn, names, chunk_size)
    try:
        return ghost_squared_norms(
            model, x, y, loss_fn, names, chunk_size, strict=backend == "ghost"
        )
    except GhostUnsupported as err:
        if backend == "ghost":
            raise _ghost_refusal(err) from err
        return vmap_squared_norms(model, x, y, loss_fn, names, chunk_size)


def per_sample_grad_norm_and_forward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    forward: ForwardWithExtras,
    loss="ce",
    params=None,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """(per_sample_grad_norm(model, x, y, ...), forward(x)) where forward(x) -> (logits of model, extras).

    For a caller that needs the model's outputs on x as well as the norms (the engine: logits and
    features of the generated images). The ghost backend's own forward pass serves both, which
    saves a forward and a backward of the model on x; other backends (and chunked ghost) call
    forward separately. forward must compute model(x)'s logits, may read any activations on the
    way (through hooks) and returns them in extras, a pytree of tensors.
    """
    if not callable(forward):
        raise TypeError(
            f"forward must be a callable x -> (logits, extras), got {type(forward).__name__}"
        )
    with unwrapped(model, params) as (inner, inner_params), _twice_differentiable_attention():
        names = _validate(inner, x, y, loss, inner_params, backend, "per_sample", chunk_size)
        loss_fn = resolve_loss(loss)
        if backend in ("auto", "ghost") and (chunk_size is None or chunk_size >= x.shape[0]):
            try:
                squared, outputs = ghost_squared_norms_and_outputs(
                    inner, x, y, loss_fn, names, forward, strict=backend == "ghost"
                )
                return safe_sqrt(squared), outputs
            except GhostUnsupported as err:
                if backend == "ghost":
                    raise _ghost_refusal(err) from err
                backend = "vmap"
        norms = safe_sqrt(_squared_norms(inner, x, y, loss_fn, names, backend, chunk_size))
    return norms, forward(x)


@dataclass(frozen=True)
class Route:
    """How one group of chosen parameters is measured: by `module`'s registered rule, by vmap over
    that module alone, or (module "model") by the whole-model vmap or loop backend, and why."""

    module: str
    params: tuple[str, ...]
    served_by: str


def explain_grad_norm(
    model: nn.Module, x: torch.Tensor, params=None, backend: str = "auto"
) -> list[Route]:
    """Which rule serves each layer in per_sample_grad_norm(model, x, ..., params, backend), from
    the same plan the call makes (a rule whose result fails its shape check at run time is vmapped
    instead by `auto`, and refused by `ghost`)."""
    with unwrapped(model, params) as (model, params):
        names = _validate(model, x, None, "ce", params, backend, "per_sample", None)
        if backend in ("vmap", "loop"):
            return [
                Route("model", names, f"the whole-model {backend} backend (backend={backend!r})")
            ]
        try:
            layers = plan_layers(model, x, names)
        except GhostUnsupported as err:
            if backend == "ghost":
                raise _ghost_refusal(err) from err
            return [Route("model", names, f"the whole-model vmap backend: {err}")]
    return [
        Route(
            layer.where,
            tuple(f"{layer.path}.{n}" if layer.path else n for n in layer.names),
            f"rule {layer.rule.name}"
            if layer.rule is not None
            else f"vmap of this module alone: {layer.why_vmap}",
        )
        for layer in layers
    ]


def batch_mean_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss="ce",
    params=None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """grad_theta (1/B) sum_i l(f_theta(x_i), y_i), one tensor per chosen parameter, keeping the graph
    to x (what mode="batch" takes the norm of). Arguments as for per_sample_grad_norm."""
    with unwrapped(model, params) as (model, params), _twice_differentiable_attention():
        names = _validate(model, x, y, loss, params, backend, "batch", chunk_size)
        return _batch_mean_gradient(model, x, y, resolve_loss(loss), names, backend, chunk_size)


def _batch_mean_gradient(
    model, x, y, loss_fn, names, backend, chunk_size
) -> tuple[torch.Tensor, ...]:
    if backend == "loop":
        return loop_batch_gradient(model, x, y, loss_fn, names)
    return batch_gradient(model, x, y, loss_fn, names, chunk_size)


def _twice_differentiable_attention():
    """A context computing scaled dot-product attention by its math form while a norm's graph is
    built: d/dx of a norm is a double backward, which the fused attention kernels (flash,
    memory-efficient, and the CPU flash kernel nn.MultiheadAttention(need_weights=False) takes)
    do not implement."""
    return sdpa_kernel(SDPBackend.MATH)


def _ghost_refusal(err: GhostUnsupported) -> ValueError:
    return ValueError(f"backend='ghost' cannot handle this model: {err}; use backend='vmap'")


def _validate(model, x, y, loss, params, backend, mode, chunk_size) -> tuple[str, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    resolve_loss(loss)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(
            f"x must be a floating-point tensor (B, ...), got {getattr(x, 'dtype', type(x))}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
    if y is not None:  # None: explain_grad_norm, which takes no labels
        _validate_labels(x, y, loss)
    check_samples_independent(model)
    names = resolve_params(model, params)
    check_backend_limits(model, names, backend)
    if loss == "ce" and y is not None:
        check_labels(model, x, y)
    return names


def _validate_labels(x, y, loss) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be a tensor with one entry per sample of x (batch {x.shape[0]}), "
            f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if loss == "ce" and (y.dim() != 1 or y.dtype not in (torch.int64, torch.int32)):
        raise TypeError(
            f"y must be (B,) integer class labels for loss='ce', got {y.dtype} {tuple(y.shape)}"
        )
