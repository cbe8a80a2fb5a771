"""Models that arrive wrapped by another per-sample-gradient tool, unwrapped for the measurement.

An Opacus GradSampleModule (any AbstractGradSampleModule) keeps the user's model as `_module` and
adds a forward hook and a full backward hook to each of its layers; the backward hooks cannot run
under torch.func. The measurement runs on `_module` with exactly those hooks suspended (the user's
own hooks stay), and parameter names given with the wrapper's "_module." prefix are mapped onto
the inner model. Nothing on the wrapper changes. A wrapper of that family without `_module` is
refused by name.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import nn

from tldr_fast.module_hooks import hooks_suspended

_PREFIX = "_module."


def _is_opacus_wrapper(model: nn.Module) -> bool:
    return any(
        cls.__name__ == "AbstractGradSampleModule" and cls.__module__.startswith("opacus")
        for cls in type(model).__mro__
    )


def _inner_names(params):
    if params is None or not isinstance(params, (list, tuple, str)):
        return params
    if isinstance(params, str):
        return params.removeprefix(_PREFIX)
    return [p.removeprefix(_PREFIX) if isinstance(p, str) else p for p in params]


@contextmanager
def unwrapped(model: nn.Module, params):
    """(model, params) to measure: an Opacus wrapper's inner module (its hooks suspended) and
    params renamed onto it, or the arguments unchanged."""
    if not _is_opacus_wrapper(model):
        yield model, params
        return
    inner = getattr(model, "_module", None)
    if not isinstance(inner, nn.Module):
        raise ValueError(
            f"model is an Opacus {type(model).__name__} without a wrapped _module; pass the "
            "module it wraps instead"
        )
    handles = getattr(inner, "autograd_grad_sample_hooks", None)
    with hooks_suspended(handles) if handles else nullcontext():
        yield inner, _inner_names(params)
