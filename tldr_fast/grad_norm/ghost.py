"""The `ghost` backend: per-sample norms from each layer's input and output gradient, without
materialising per-sample gradients of the whole model.

`plan.plan_layers` assigns every chosen parameter to the module that serves it and checks the
decomposition. One batched forward then adds a zero "probe" tensor to every output of each serving
module; torch.func.grad of sum_i l_i with respect to the probes gives every layer's output gradient
g (sample i's slice = dl_i/dout_i, since samples do not interact) in one backward, in a way that
composes with outer torch.func transforms and torch.compile, and keeps the graph to x. Each layer's
squared norm then comes from its registered rule (`registry`), with the batch moved to dim 0, or,
for other modules, from torch.func.vmap(grad) of <module(a_i), g_i> over that module's own chosen
parameters, vmapped over each input's and output's batch dimension. The per-sample squared norm is
the sum over layers, which holds because each chosen parameter is served by exactly one module call
that encloses all its uses. Frozen convolutions and eval BatchNorm add their probe through
`frozen.probed_output`, the same value by a route with a cheaper double backward.

Every rule's result is checked to be (B,); where it is not, the layer is vmapped instead
(`strict=False`, the `auto` backend) or the call is refused naming the rule and the layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from tldr_fast.grad_norm.frozen import probed_output
from tldr_fast.grad_norm.normalization import decomposed_normalisations
from tldr_fast.grad_norm.plan import GhostUnsupported, Layer, plan_layers
from tldr_fast.grad_norm.refusals import vmap_limit
from tldr_fast.grad_norm.selection import PerSampleLoss, sum_of_squares
from tldr_fast.module_hooks import temporary_forward_hooks

# forward(x) -> (logits, extras): the model's forward, plus any tensors (a pytree) to hand back.
ForwardWithExtras = Callable[[torch.Tensor], tuple[torch.Tensor, object]]


def _probed_forward(layers: list[Layer], x, y, loss_fn, forward):
    """Output gradients (per layer, per probed output leaf), every layer's input leaves (tensors
    only, as torch.func aux must be) and forward's outputs; the non-tensor input leaves and their
    structure come back separately."""
    structure: dict[int, tuple] = {}

    def summed_loss(probes):
        inputs: dict[int, list[torch.Tensor]] = {}

        def hook_for(i):
            layer = layers[i]

            def add_probes(module, args, kwargs, output):
                leaves, spec = tree_flatten((args, kwargs))
                inputs[i] = [v for v in leaves if isinstance(v, torch.Tensor)]
                structure[i] = (leaves, spec)
                cheaper = probed_output(module) if layer.rule is not None else None
                if cheaper is not None:
                    return cheaper(module, inputs[i][0], output, probes[i][0])
                out_leaves, out_spec = tree_flatten(output)
                return tree_unflatten(
                    [v + probes[i][j] if j in probes[i] else v for j, v in enumerate(out_leaves)],
                    out_spec,
                )

            return add_probes

        with temporary_forward_hooks([layer.module for layer in layers], hook_for):
            logits, extras = forward(x)
        return loss_fn(logits, y).sum(), (inputs, (logits, extras))

    # Zero probes as broadcast views of one scalar: no memory and no fill pass over the activations.
    probes = {
        i: {
            j: torch.zeros((), dtype=spec[1], device=x.device).expand(spec[0])
            for j, spec in enumerate(layer.output_specs)
            if spec is not None
        }
        for i, layer in enumerate(layers)
    }
    output_grads, (inputs, outputs) = grad(summed_loss, has_aux=True)(probes)
    return output_grads, inputs, structure, outputs


def module_vmap_squared_norms(
    layer: Layer, tensors, structure, grads: dict[int, torch.Tensor]
) -> torch.Tensor:
    """||grad_theta sum_j <out_j(a_i), g_ij>||^2 per sample over the layer's chosen parameters theta,
    the module run on one sample at a time (each tensor keeps a size-1 batch dimension where it had
    one, so the module sees its usual layout)."""
    reason = vmap_limit(layer.module, layer.path)
    if reason is not None:
        raise ValueError(reason)
    leaves, spec = structure
    tensor_dims = [
        d
        for v, d in zip(leaves, layer.input_batch_dims, strict=True)
        if isinstance(v, torch.Tensor)
    ]
    probed = sorted(grads)

    def contribution(theta, sample_grads, *sample_tensors):
        it = iter(
            t if d is None else t.unsqueeze(d)
            for t, d in zip(sample_tensors, tensor_dims, strict=True)
        )
        args, kwargs = tree_unflatten(
            [next(it) if isinstance(v, torch.Tensor) else v for v in leaves], spec
        )
        out_leaves = tree_flatten(functional_call(layer.module, theta, args, kwargs))[0]
        return sum(
            (out_leaves[j] * g.unsqueeze(layer.output_batch_dims[j])).sum()
            for j, g in zip(probed, sample_grads, strict=True)
        )

    theta = {n: layer.module.get_parameter(n) for n in layer.names}
    in_dims = (None, [layer.output_batch_dims[j] for j in probed], *tensor_dims)
    with decomposed_normalisations(layer.module):
        per_sample = vmap(grad(contribution), in_dims=in_dims)(
            theta, [grads[j] for j in probed], *tensors
        )
    return sum_of_squares(per_sample.values())


def _rule_squared_norms(
    layer: Layer, a: torch.Tensor, g: torch.Tensor, batch: int
) -> torch.Tensor | str:
    """The layer's rule on (a, g) with the batch moved to dim 0, or why its result is unusable."""
    d = layer.output_batch_dims[0]
    result = layer.rule.rule(layer.module, layer.names, a.movedim(d, 0), g.movedim(d, 0))
    if not isinstance(result, torch.Tensor) or result.shape != (batch,):
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        return f"rule {layer.rule.name} for {layer.where} returned {shape}, not ({batch},)"
    return result


def ghost_squared_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: PerSampleLoss,
    names: tuple[str, ...],
    chunk_size: int | None = None,
    strict: bool = True,
) -> torch.Tensor:
    """(B,) squared per-sample gradient norms of the chosen parameters; raises GhostUnsupported."""
    if chunk_size is not None and chunk_size < x.shape[0]:
        return torch.cat(
            [
                ghost_squared_norms(
                    model,
                    x[s : s + chunk_size],
                    y[s : s + chunk_size],
                    loss_fn,
                    names,
                    strict=strict,
                )
                for s in range(0, x.shape[0], chunk_size)
            ]
        )
    return ghost_squared_norms_and_outputs(
        model, x, y, loss_fn, names, lambda v: (model(v), ()), strict
    )[0]


def ghost_squared_norms_and_outputs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: PerSampleLoss,
    names: tuple[str, ...],
    forward: ForwardWithExtras,
    strict: bool = True,
):
    """((B,) squared norms, forward(x)) from one pass: the logits whose loss is differentiated, and
    any extra tensors forward captured on the way (features, hooked activations), all keeping their
    graph to x, so a caller that needs them too does not run the model a second time."""
    layers = plan_layers(model, x, names)
    output_grads, inputs, structure, outputs = _probed_forward(layers, x, y, loss_fn, forward)
    batch = x.shape[0]
    total = x.new_zeros(batch)
    for i, layer in enumerate(layers):
        squared = None
        if layer.rule is not None:
            squared = _rule_squared_norms(layer, inputs[i][0], output_grads[i][0], batch)
            if isinstance(squared, str):
                if strict:
                    raise GhostUnsupported(squared)
                squared = None
        if squared is None:
            squared = module_vmap_squared_norms(layer, inputs[i], structure[i], output_grads[i])
        total = total + squared
    return total, outputs
