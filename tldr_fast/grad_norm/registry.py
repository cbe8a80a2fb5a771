"""The open registry of closed-form ghost rules: module type -> per-sample squared-norm rule.

A rule computes, for one layer, the per-sample squared norm of the gradient of its chosen
parameters from the layer's input a and the gradient g of the summed loss with respect to its
output (row i of g is dl_i/dout_i, since samples do not interact):

    rule(module, names, a, g) -> (B,)      names: the module's own chosen parameter names

with the batch on dim 0 of a and g. Rules are plain tensor code, so the norms stay differentiable
with respect to a and g (and hence x). Modelled on Opacus's `register_grad_sampler`: the decorator
registers a function for exact module types (a subclass may override forward and break the
formula), here with two more facts the ghost planner needs:

- `applies(module) -> bool`: whether this module's configuration is one the formula covers (a
  convolution's padding mode, an Embedding's max_norm); the layer is vmapped otherwise;
- `layout`: "batch_first" when the module treats dim 0 as the batch (convolutions, BatchNorm,
  GroupNorm), "features_last" when it acts on trailing features and any leading dimension may be
  the batch (Linear, LayerNorm, Embedding fed (T, N, ...)), which the planner then moves to dim 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# rule(module, parameter names chosen on this module, input a (B, ...), output gradient g (B, ...)) -> (B,)
Rule = Callable[[nn.Module, tuple[str, ...], torch.Tensor, torch.Tensor], torch.Tensor]

LAYOUTS = ("batch_first", "features_last")


@dataclass(frozen=True)
class NormRule:
    """A registered rule with its conditions."""

    rule: Rule
    applies: Callable[[nn.Module], bool] | None
    layout: str

    @property
    def name(self) -> str:
        return f"{self.rule.__module__}.{self.rule.__qualname__}"


_RULES: dict[type, NormRule] = {}


def register_norm_rule(
    *module_types: type,
    applies: Callable[[nn.Module], bool] | None = None,
    layout: str = "batch_first",
):
    """Decorator registering `rule` as the ghost rule for each of module_types (exact types).

        @register_norm_rule(MyScale)
        def my_scale_rule(module, names, a, g):          # y = a * module.scale
            return (a * g).flatten(1).sum(1).pow(2)      # ||dl_i/dscale||^2, shape (B,)

    A later registration for the same type replaces the earlier one (as in Opacus).
    """
    if not module_types or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in module_types
    ):
        raise TypeError(f"register_norm_rule takes nn.Module subclasses, got {module_types!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if applies is not None and not callable(applies):
        raise TypeError(f"applies must be a callable module -> bool, got {type(applies).__name__}")

    def register(rule: Rule) -> Rule:
        if not callable(rule):
            raise TypeError(f"a norm rule must be callable, got {type(rule).__name__}")
        for module_type in module_types:
            _RULES[module_type] = NormRule(rule, applies, layout)
        return rule

    return register


def rule_for(module: nn.Module) -> NormRule | None:
    """The registered rule for this module's exact type if its configuration is covered, else None."""
    entry = _RULES.get(type(module))
    if entry is None or (entry.applies is not None and not entry.applies(module)):
        return None
    return entry


def registered_types() -> tuple[type, ...]:
    """Module types with a registered rule, in registration order."""
    return tuple(_RULES)
