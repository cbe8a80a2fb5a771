"""The `ghost` backend: per-sample norms from each layer's input and output gradient, without
materialising per-sample gradients of the whole model.

One batched forward adds a zero "probe" tensor to the output of every layer that owns a chosen
parameter; torch.func.grad of sum_i l_i with respect to the probes gives every layer's output
gradient g (row i = dl_i/dout_i, since samples do not interact) in one backward, in a way that
composes with outer torch.func transforms and torch.compile, and keeps the graph to x. Each
layer's squared norm then comes from `layers.closed_form_rule`, or, for other parameterised
modules (GroupNorm, custom ones), from torch.func.vmap(grad) of <module(a_i), g_i> over that
module's own parameters. The per-sample squared norm is the sum over layers, which holds because
each chosen parameter belongs to exactly one module that runs exactly once per forward. Frozen
convolutions and eval BatchNorm add their probe through `frozen.probed_output`, the same value by
a route with a cheaper double backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from tldr_fast.grad_norm.frozen import ProbedOutput, probed_output
from tldr_fast.grad_norm.layers import Rule, closed_form_rule
from tldr_fast.grad_norm.selection import PerSampleLoss, sum_of_squares
from tldr_fast.module_hooks import temporary_forward_hooks

# forward(x) -> (logits, extras): the model's forward, plus any tensors (a pytree) to hand back.
ForwardWithExtras = Callable[[torch.Tensor], tuple[torch.Tensor, object]]


class GhostUnsupported(ValueError):
    """The model breaks an assumption of the ghost decomposition (shared weights, a module called
    twice, a non-tensor output); the vmap backend handles it."""


@dataclass(frozen=True)
class Layer:
    """A module owning chosen parameters (directly, not through children), and how to norm them."""

    path: str
    module: nn.Module
    names: tuple[str, ...]
    rule: Rule | None
    probed_output: ProbedOutput | None


def plan_layers(model: nn.Module, names: tuple[str, ...]) -> list[Layer]:
    """Group the chosen parameters by owning module; refuse parameters shared between modules."""
    owners: dict[int, list[str]] = {}
    for full_name, tensor in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(tensor), []).append(full_name)
    named = dict(model.named_parameters())
    local: dict[str, list[str]] = {}
    for full_name in names:
        shared = owners[id(named[full_name])]
        if len(shared) > 1:
            raise GhostUnsupported(f"parameter {full_name} is shared as {', '.join(shared)}")
        path, _, attr = full_name.rpartition(".")
        local.setdefault(path, []).append(attr)
    modules = {path: model.get_submodule(path) for path in local}
    return [Layer(path, modules[path], tuple(attrs), closed_form_rule(modules[path]),
                  probed_output(modules[path]))
            for path, attrs in local.items()]


def fully_closed_form(model: nn.Module, names: tuple[str, ...]) -> bool:
    """True when every chosen parameter sits in a layer with a closed-form rule (what `auto` needs)."""
    try:
        return all(layer.rule is not None for layer in plan_layers(model, names))
    except GhostUnsupported:
        return False


def _output_specs(model: nn.Module, layers: list[Layer], x: torch.Tensor) -> list:
    """(shape, dtype) of each layer's output, from a forward on the meta device (no compute; a
    dead-code forward under torch.compile), or None for a layer the forward does not reach."""
    specs: list = [None] * len(layers)

    def hook_for(i):
        def record(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor):
                raise GhostUnsupported(f"model.{layers[i].path} returns {type(output).__name__}, not a tensor")
            if specs[i] is not None:
                raise GhostUnsupported(f"model.{layers[i].path} runs more than once per forward")
            specs[i] = (output.shape, output.dtype)
        return record

    with temporary_forward_hooks([layer.module for layer in layers], hook_for):
        if torch.compiler.is_compiling():
            # Fake tensors under torch.func cannot run BatchNorm on meta ("ambiguous autogradother
            # kernel"); a real no-grad forward traces, and its unused values are dead code.
            with torch.no_grad():
                model(x.detach())
        else:
            state = {n: torch.empty_like(t, device="meta")
                     for n, t in [*model.named_parameters(), *model.named_buffers()]}
            functional_call(model, state, (torch.empty(x.shape, dtype=x.dtype, device="meta"),))
    return specs


def _probed_forward(model, layers, specs, x, y, loss_fn, forward):
    """Output gradients g_l, the flattened inputs of every reached layer and forward's outputs;
    non-tensor input leaves and their structure come back separately (torch.func aux must be
    tensors only)."""
    structure: dict[int, tuple] = {}

    def summed_loss(probes):
        inputs: dict[int, list[torch.Tensor]] = {}

        def hook_for(i):
            def add_probe(module, args, kwargs, output):
                leaves, spec = tree_flatten((args, kwargs))
                inputs[i] = [v for v in leaves if isinstance(v, torch.Tensor)]
                structure[i] = (leaves, spec)
                if layers[i].probed_output is not None:
                    return layers[i].probed_output(module, inputs[i][0], output, probes[i])
                return output + probes[i]
            return add_probe

        with temporary_forward_hooks([layer.module for layer in layers], hook_for):
            logits, extras = forward(x)
        return loss_fn(logits, y).sum(), (inputs, (logits, extras))

    reached = {i: spec for i, spec in enumerate(specs) if spec is not None}
    # Zero probes as broadcast views of one scalar: no memory and no fill pass over the activations.
    probes = {i: torch.zeros((), dtype=dtype, device=x.device).expand(shape) for i, (shape, dtype) in reached.items()}
    output_grads, (inputs, outputs) = grad(summed_loss, has_aux=True)(probes)
    return output_grads, inputs, structure, outputs


def _module_vmap_squared_norms(layer: Layer, tensors, structure, g, chunk_size) -> torch.Tensor:
    """||grad_theta <module(a_i), g_i>||^2 per sample, theta = the layer's own chosen parameters."""
    leaves, spec = structure
    batch = g.shape[0]
    batched = [t.dim() > 0 and t.shape[0] == batch for t in tensors]

    def contribution(theta, g_i, *sample_tensors):
        it = iter(t.unsqueeze(0) if b else t for t, b in zip(sample_tensors, batched, strict=True))
        args, kwargs = tree_unflatten([next(it) if isinstance(v, torch.Tensor) else v for v in leaves], spec)
        return (functional_call(layer.module, theta, args, kwargs) * g_i.unsqueeze(0)).sum()

    theta = {n: getattr(layer.module, n) for n in layer.names}
    in_dims = (None, 0, *[0 if b else None for b in batched])
    per_sample = vmap(grad(contribution), in_dims=in_dims, chunk_size=chunk_size)(theta, g, *tensors)
    return sum_of_squares(per_sample.values())


def ghost_squared_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss,
                        names: tuple[str, ...], chunk_size: int | None = None) -> torch.Tensor:
    """(B,) squared per-sample gradient norms of the chosen parameters; raises GhostUnsupported."""
    if chunk_size is not None and chunk_size < x.shape[0]:
        return torch.cat([ghost_squared_norms(model, x[s : s + chunk_size], y[s : s + chunk_size], loss_fn,
                                              names) for s in range(0, x.shape[0], chunk_size)])
    return ghost_squared_norms_and_outputs(model, x, y, loss_fn, names, lambda v: (model(v), ()))[0]


def ghost_squared_norms_and_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss,
                                    names: tuple[str, ...], forward: ForwardWithExtras):
    """((B,) squared norms, forward(x)) from one pass: the logits whose loss is differentiated, and
    any extra tensors forward captured on the way (features, hooked activations), all keeping their
    graph to x, so a caller that needs them too does not run the model a second time."""
    layers = plan_layers(model, names)
    specs = _output_specs(model, layers, x)
    output_grads, inputs, structure, outputs = _probed_forward(model, layers, specs, x, y, loss_fn, forward)
    total = x.new_zeros(x.shape[0])
    for i, g in output_grads.items():
        layer = layers[i]
        if layer.rule is not None:
            total = total + layer.rule(layer.module, layer.names, inputs[i][0], g)
        else:
            total = total + _module_vmap_squared_norms(layer, inputs[i], structure[i], g, None)
    return total, outputs
