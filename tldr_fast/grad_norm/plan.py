"""Which module serves which chosen parameter in the ghost backend, and the checks that make a
silently wrong decomposition impossible.

Two no-grad probe forwards on 2 and 3 samples of x record, for every module call, the shapes of
its tensor inputs and outputs, and, through a TorchFunctionMode, which module calls were active
whenever a chosen parameter entered a torch function. From them:
- a tensor's batch dimension is the one dimension whose size goes from 2 to 3 (none: the tensor
  is shared by all samples; another change, such as 2 T -> 3 T, or several: the batch is merged
  with other dimensions and no per-sample split exists there); its shape at batch B follows;
- a parameter is served by the innermost module call that encloses all its uses, is called once per
  forward and has batched outputs (its owner, normally; an attention module for an out_proj it
  uses without calling; the parametrised module for a weight_norm parametrisation);
- that module uses its registered rule when the parameters are its own and used only in its own
  call, it has no forward hooks of its own (they may change its output), its output is one tensor
  and its batch dimension is where the rule's layout wants it (dim 0, or any leading dimension for
  "features_last" layers such as Linear on (T, N, D)); otherwise it is vmapped over its batch
  dimensions (`ghost._module_vmap_squared_norms`).
A parameter no probe sees, one shared between modules, or one whose only enclosing call is the
whole model makes the plan fail (GhostUnsupported, with the reason): `auto` then vmaps the whole
model and `ghost` refuses.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tldr_fast.grad_norm.registry import NormRule, registered_types, rule_for
from tldr_fast.module_hooks import temporary_forward_hooks, temporary_forward_pre_hooks

MERGED = "merged"
# The probe forwards' batch sizes are this and one more (not 1: squeeze() would drop the batch).
_PROBE_BATCH = 2  # a batch dimension merged with others: sizes change, but not from B to B + 1


class GhostUnsupported(ValueError):
    """The model breaks an assumption of the ghost decomposition; the vmap backend handles it."""


@dataclass
class _Call:
    count: int = 0
    inputs: list = field(
        default_factory=list
    )  # per leaf of (args, kwargs): shape, or None if not a tensor
    outputs: list = field(default_factory=list)  # per leaf of the output: (shape, dtype), or None


@dataclass(frozen=True)
class Layer:
    """A module serving chosen parameters, and how."""

    path: str
    module: nn.Module
    names: tuple[str, ...]  # relative to the module
    rule: NormRule | None
    input_batch_dims: tuple  # per leaf of (args, kwargs): int, or None (not batched / not a tensor)
    output_batch_dims: tuple  # per leaf of the output: int, or None (not probed)
    output_specs: tuple  # per leaf of the output: (shape, dtype) at batch B, or None
    why_vmap: str  # empty when the rule serves the layer

    @property
    def where(self) -> str:
        return f"model.{self.path}" if self.path else "model"


class _ParameterUses(TorchFunctionMode):
    """Records, per chosen parameter, the stacks of module paths active at each of its uses."""

    def __init__(self, names_by_id: dict[int, str], stack: list[str]):
        super().__init__()
        self.names_by_id, self.stack = names_by_id, stack
        self.uses: dict[str, list[tuple[str, ...]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in _leaves((args, kwargs)):
            name = self.names_by_id.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is not None:
                self.uses.setdefault(name, []).append(tuple(self.stack))
        return func(*args, **kwargs)


def _leaves(args_and_kwargs) -> list:
    """tree_flatten(...)[0], without its cost for the common case of positional tensors only."""
    args, kwargs = args_and_kwargs
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return list(args)
    return tree_flatten(args_and_kwargs)[0]


def _leaf_specs(leaves, with_dtype: bool) -> list:
    return [
        ((v.shape, v.dtype) if with_dtype else v.shape) if isinstance(v, torch.Tensor) else None
        for v in leaves
    ]


def _probe_forward(
    model: nn.Module, x: torch.Tensor, batch: int, names: tuple[str, ...], track_uses: bool
):
    """({path: _Call}, {name: [stacks]}) from one no-grad forward on `batch` samples of x (repeated
    if x holds fewer). A real forward on a few samples costs less than one on the meta device,
    whose Python decompositions take ~0.1 s for a small CNN, and traces under torch.compile."""
    paths = [p for p, _ in model.named_modules()]
    modules = [model.get_submodule(p) for p in paths]
    calls = {p: _Call() for p in paths}
    stack: list[str] = []

    def push_for(i):
        def push(module, args, kwargs):
            stack.append(paths[i])

        return push

    def pop_for(i):
        def pop(module, args, kwargs, output):
            stack.pop()
            call = calls[paths[i]]
            call.count += 1
            outputs = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
            call.inputs, call.outputs = (
                _leaf_specs(_leaves((args, kwargs)), False),
                _leaf_specs(outputs, True),
            )

        return pop

    named = dict(model.named_parameters())
    uses = _ParameterUses({id(named[n]): n for n in names}, stack)
    samples = x.detach()[torch.arange(batch, device=x.device) % x.shape[0]]
    with (
        temporary_forward_pre_hooks(modules, push_for),
        temporary_forward_hooks(modules, pop_for),
        torch.no_grad(),
        uses if track_uses else nullcontext(),
    ):
        model(samples)
    return calls, uses.uses


def _batch_dim(at_b, at_b1, batch: int):
    """The dim whose size goes from batch to batch + 1, None if no size changes, else MERGED."""
    if at_b is None or at_b1 is None:
        return None
    if len(at_b) != len(at_b1):
        return MERGED
    changed = [d for d, (m, n) in enumerate(zip(at_b, at_b1, strict=True)) if m != n]
    if not changed:
        return None
    if len(changed) == 1 and at_b[changed[0]] == batch and at_b1[changed[0]] == batch + 1:
        return changed[0]
    return MERGED


def _with_size(shape, dim: int, size: int) -> torch.Size:
    return torch.Size([size if d == dim else n for d, n in enumerate(shape)])


def _common_prefix(stacks: list[tuple[str, ...]]) -> tuple[str, ...]:
    prefix = stacks[0]
    for s in stacks[1:]:
        n = 0
        while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _where(path: str) -> str:
    return f"model.{path}" if path else "model"


def _check_unshared(model: nn.Module, names: tuple[str, ...]) -> None:
    owners: dict[int, list[str]] = {}
    for full_name, tensor in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(tensor), []).append(full_name)
    named = dict(model.named_parameters())
    for full_name in names:
        shared = owners[id(named[full_name])]
        if len(shared) > 1:
            raise GhostUnsupported(f"parameter {full_name} is shared as {', '.join(shared)}")


def plan_layers(model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[Layer]:
    """The layers serving the chosen parameters (see the module docstring); raises GhostUnsupported."""
    _check_unshared(model, names)
    batch = _PROBE_BATCH
    calls, uses = _probe_forward(model, x, batch, names, track_uses=True)
    calls_next, _ = _probe_forward(model, x, batch + 1, names, track_uses=False)

    def dims(path):
        call, nxt = calls[path], calls_next[path]
        inputs = tuple(
            _batch_dim(a, b, batch) for a, b in zip(call.inputs, nxt.inputs, strict=True)
        )
        outputs = tuple(
            _batch_dim(a and a[0], b and b[0], batch)
            for a, b in zip(call.outputs, nxt.outputs, strict=True)
        )
        return inputs, outputs

    def unfit(path) -> str:
        """Why the module at path cannot serve parameters in the decomposition ('' if it can)."""
        call = calls[path]
        if call.count == 0:
            return f"{_where(path)} is never called"
        if call.count > 1:
            return f"{_where(path)} runs more than once per forward"
        if (
            calls_next[path].count != 1
            or len(calls_next[path].outputs) != len(call.outputs)
            or len(calls_next[path].inputs) != len(call.inputs)
        ):
            return f"{_where(path)} is called differently at another batch size"
        inputs, outputs = dims(path)
        probed = [
            d
            for d, spec in zip(outputs, call.outputs, strict=True)
            if spec is not None and spec[1].is_floating_point
        ]
        if not probed:
            return f"{_where(path)} returns no floating-point tensor"
        if MERGED in inputs or MERGED in outputs:
            return f"{_where(path)} merges the batch with other dimensions (e.g. (B T, D) rows)"
        if None in probed:
            return f"{_where(path)} returns a tensor without a batch dimension"
        return ""

    assigned: dict[str, list[str]] = {}
    for name in names:
        owner = name.rpartition(".")[0]
        if name not in uses:
            raise GhostUnsupported(
                f"parameter {name} is never used by a torch function in a forward "
                f"({unfit(owner) or 'its module is called, but not on it'})"
            )
        enclosing = _common_prefix(uses[name])
        # The whole model serves only its own parameters: for a submodule's, it would be the
        # whole-model vmap, which is the fallback's to choose.
        chosen = next((p for p in reversed(enclosing) if (p or not owner) and not unfit(p)), None)
        if chosen is None:
            innermost = enclosing[-1] if enclosing else ""
            reason = (
                unfit(owner) or unfit(innermost) or f"it is used outside {_where(owner)}'s call"
            )
            raise GhostUnsupported(f"parameter {name} cannot be split per sample: {reason}")
        assigned.setdefault(chosen, []).append(name)

    layers = []
    for path, full_names in assigned.items():
        module = model.get_submodule(path)
        local = tuple(n[len(path) + 1 :] if path else n for n in full_names)
        inputs, outputs = dims(path)
        call = calls[path]
        rule, why = _rule_or_reason(module, path, local, full_names, uses, inputs, outputs, call)
        specs = tuple(
            None
            if d is None or not spec[1].is_floating_point
            else (_with_size(spec[0], d, x.shape[0]), spec[1])
            for d, spec in zip(outputs, call.outputs, strict=True)
        )
        layers.append(Layer(path, module, local, rule, inputs, outputs, specs, why))
    return layers


def _rule_or_reason(module, path, local, full_names, uses, inputs, outputs, call):
    rule = rule_for(module)
    kind = type(module).__name__
    if rule is None:
        if type(module) in registered_types():
            return None, f"the rule registered for {kind} does not cover this configuration"
        return None, f"no rule is registered for {kind}"
    if any("." in n for n in local) or any(
        stack[-1] != path for n in full_names for stack in uses[n]
    ):
        return None, "it serves parameters of its submodules or uses them in nested calls"
    if module._forward_hooks:
        return None, "it carries forward hooks, which may change its output"
    if len(call.outputs) != 1 or not inputs or call.inputs[0] is None:
        return None, "its input or output is not a single tensor"
    a_dim, out_dim = inputs[0], outputs[0]
    wanted = out_dim == 0 if rule.layout == "batch_first" else out_dim is not None
    if a_dim != out_dim or not wanted:
        return (
            None,
            f"its batch dimension ({out_dim} of the output, {a_dim} of the input) does not fit the rule",
        )
    return rule, ""
