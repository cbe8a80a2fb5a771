"""The TLDR objective as one pure function of the stacked generator parameters.

For K generators with parameters theta_k, each with its own batch of B images x_k = G_k(z_k, c_k):

    L(theta) = sum_k [ alpha KL(c_k || f(x_k)) + alpha' KL(c_k || f(x'_k)) + beta CE(f(x_k), y_k)
                       + beta' CE(f(x'_k), y_k) + gamma Cos(phi(x_k)) + delta Ortho(phi(x_k))
                       + eta1 TV(x_k) + eta2 Pix(x_k) + eta3 mean_i ||grad_w CE(f(x_ki), y_ki)||
                       + eta_bn sum_l BN_l(x_k) ]

with f the frozen classifier's logits, phi its penultimate features, x' = perturb(x) and BN_l the
feature-statistics prior at the classifier's BatchNorm layer l (beyond the paper; off by default). Summing
over k keeps the generators independent: each theta_k receives exactly the gradient of its own
objective. Terms whose weight is zero are not computed (a static decision from the config).

`objective` has no side effects and no host synchronisation: the noise it consumes is an argument,
drawn by `draw_noise` inside the training step, so the whole step can be traced by torch.compile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tldr_fast import conditioning, losses
from tldr_fast.config import _EngineConfig
from tldr_fast.grad_norm import per_sample_grad_norm, per_sample_grad_norm_and_forward
from tldr_fast.models.generator import Generator
from tldr_fast.module_hooks import temporary_forward_hooks

# Loss terms in the order of the paper's equation, with the config field holding each weight.
TERM_WEIGHTS = {
    "kl": "alpha",
    "kl_pert": "alpha_pert",
    "ce": "beta",
    "ce_pert": "beta_pert",
    "cos": "gamma",
    "ortho": "delta",
    "tv": "eta_tv",
    "pix": "eta_pix",
    "grad": "eta_grad",
    "bn": "eta_bn",
}


def active_terms(config: _EngineConfig) -> dict[str, float]:
    """term -> weight for the terms of this config with a non-zero weight, in equation order."""
    weights = config.weights()
    return {term: weights[field] for term, field in TERM_WEIGHTS.items() if weights.get(field, 0.0) > 0}


def batch_norm_layers(classifier: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The classifier's BatchNorm layers that hold running statistics, in module order."""
    return [m for m in classifier.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None]


def needs_features(config: _EngineConfig) -> bool:
    """Whether the objective reads the classifier's penultimate features (the diversity terms)."""
    terms = active_terms(config)
    return "cos" in terms or "ortho" in terms


@dataclass(frozen=True)
class Problem:
    """Everything static about a run: the generator template, the frozen classifier and the labels."""

    template: Generator  # parameters live on the meta device; the values come from the stacked state
    classifier: nn.Module
    config: _EngineConfig
    labels: torch.Tensor  # (K, B) int64: each generator's fixed, balanced conditioning labels

    @property
    def num_classes(self) -> int:
        return self.template.num_classes

    @property
    def terms(self) -> dict[str, float]:
        return active_terms(self.config)

    @property
    def needs_features(self) -> bool:
        return needs_features(self.config)

    @property
    def needs_perturbation(self) -> bool:
        return "kl_pert" in self.terms or "ce_pert" in self.terms


def build_generators(
    config: _EngineConfig, num_classes: int, image_shape, device=None
) -> tuple[Generator, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """K freshly initialised generators, seeded from config.seed: (meta template, stacked params, buffers)."""
    gen = torch.Generator().manual_seed(config.seed)
    modules = []
    for _ in range(config.num_generators):
        # Each generator's initialisation draws from one seeded stream, independent of global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
            modules.append(make_generator(config, num_classes, image_shape))
    params, buffers = stack_module_state(modules)
    params = {k: v.detach().to(device) for k, v in params.items()}
    buffers = {k: v.detach().to(device) for k, v in buffers.items()}
    template = copy.deepcopy(modules[0]).to("meta")
    return template, params, buffers


def make_generator(config: _EngineConfig, num_classes: int, image_shape) -> Generator:
    return Generator(
        num_classes,
        tuple(image_shape),
        conditioning=config.conditioning,
        latent_dim=config.latent_dim,
        width=config.generator_width,
        dropout=config.dropout,
        output_activation=config.output_activation,
    )


def draw_noise(problem: Problem) -> dict[str, torch.Tensor]:
    """The step's random inputs from the global RNG: latents, soft-vector noise, perturbation signs."""
    k, b = problem.labels.shape
    device = problem.labels.device
    noise = {"z": torch.randn(k, b, problem.template.latent_dim, device=device)}
    if problem.config.vector_kind == "soft":
        noise["vector"] = torch.randn(k, b, problem.num_classes, device=device)
    if problem.needs_perturbation:
        noise["perturb"] = torch.randn(k, b, *problem.template.image_shape, device=device)
    return noise


def condition(problem: Problem, noise: dict[str, torch.Tensor]) -> torch.Tensor:
    """Conditioning vectors (K, B, N) of the config's kind for the problem's labels."""
    k, b = problem.labels.shape
    flat_noise = noise["vector"].flatten(0, 1) if "vector" in noise else None
    vectors = conditioning.condition_vectors(
        problem.labels.flatten(), problem.num_classes, problem.config.vector_kind, flat_noise
    )
    return vectors.view(k, b, -1)


def generate(template: Generator, params, buffers, z, labels, vectors) -> torch.Tensor:
    """Images (K, B, C, H, W) from K stacked generators in one vectorised call."""

    def one(p, bufs, z_k, y_k, v_k):
        return functional_call(template, (p, bufs), (z_k, y_k, v_k))

    return vmap(one, randomness="different")(params, buffers, z, labels, vectors)


def _classify(classifier: nn.Module, needs_features: bool, bn_layers, x: torch.Tensor):
    """(logits, extras): extras["feat"] the penultimate features when needed, extras["bn"] the input
    of every layer in bn_layers (a dict of tensors only, so it can be torch.func aux output)."""
    bn_inputs: list[torch.Tensor] = [None] * len(bn_layers)

    def hook_for(i):
        def keep_input(module, args, kwargs, output):
            bn_inputs[i] = args[0]
        return keep_input

    with temporary_forward_hooks(bn_layers, hook_for):
        if needs_features:
            logits, feat = classifier.forward_with_features(x)
        else:
            logits, feat = classifier(x), None
    extras = {"bn": bn_inputs}
    if feat is not None:
        extras["feat"] = feat
    return logits, extras


def _feature_statistics_term(problem: Problem, bn_layers, bn_inputs) -> torch.Tensor:
    """(K,) sum over BatchNorm layers of each generator's feature-statistics distance, clean images only."""
    k, b = problem.labels.shape
    total = 0
    for layer, a in zip(bn_layers, bn_inputs, strict=True):
        per_generator = a[: k * b].unflatten(0, (k, b))
        total = total + vmap(losses.feature_statistics, in_dims=(0, None, None))(
            per_generator, layer.running_mean, layer.running_var)
    return total


def objective(params, buffers, noise, problem: Problem):
    """(scalar loss summed over generators, {term: (K,) detached values, 'total': (K,)})."""
    cfg, terms = problem.config, problem.terms
    k, b = problem.labels.shape
    vectors = condition(problem, noise)
    x = generate(problem.template, params, buffers, noise["z"], problem.labels, vectors)
    flat_x, flat_y = x.flatten(0, 1), problem.labels.flatten()

    bn_layers = batch_norm_layers(problem.classifier) if "bn" in terms else []
    classify = partial(_classify, problem.classifier, problem.needs_features, bn_layers)
    perturbed = losses.perturb(flat_x, cfg.eps, noise["perturb"].flatten(0, 1)) if problem.needs_perturbation else None
    values: dict[str, torch.Tensor] = {}
    if "grad" in terms and cfg.grad_norm_mode == "per_sample":
        # The norms' own forward pass on the clean images also gives their logits and features.
        norms, (logits, extras) = per_sample_grad_norm_and_forward(
            problem.classifier, flat_x, flat_y, classify, backend=cfg.grad_norm_backend,
            chunk_size=cfg.grad_norm_chunk_size)
        values["grad"] = norms.view(k, b).mean(1)
        if perturbed is not None:
            logits = torch.cat([logits, problem.classifier(perturbed)])
    else:
        # Clean and perturbed images share one classifier pass (eval-mode BN: samples independent).
        logits, extras = classify(flat_x if perturbed is None else torch.cat([flat_x, perturbed]))
        if "grad" in terms:
            values["grad"] = _batch_grad_norm_term(problem, x)
    logits = logits.view(-1, k, b, logits.shape[-1])  # (1 or 2, K, B, N): clean, then perturbed
    if "kl" in terms:
        values["kl"] = vmap(losses.kl)(logits[0], vectors)
    if "kl_pert" in terms:
        values["kl_pert"] = vmap(losses.kl)(logits[1], vectors)
    if "ce" in terms:
        values["ce"] = vmap(losses.ce)(logits[0], problem.labels)
    if "ce_pert" in terms:
        values["ce_pert"] = vmap(losses.ce)(logits[1], problem.labels)
    if problem.needs_features:
        clean_feat = extras["feat"][: k * b].view(k, b, -1)
        diversity = partial(losses.diversity_losses, normalized=cfg.ortho_normalized, impl=cfg.impl)
        values["cos"], values["ortho"] = vmap(diversity)(clean_feat)
    if "tv" in terms or "pix" in terms:
        values["tv"], values["pix"] = vmap(partial(losses.tv_pixel, impl=cfg.impl))(x)
    if "bn" in terms:
        values["bn"] = _feature_statistics_term(problem, bn_layers, extras["bn"])

    per_generator = sum(weight * values[term] for term, weight in terms.items())
    report = {term: values[term].detach() for term in values}
    report["total"] = per_generator.detach()
    return per_generator.sum(), report


def _batch_grad_norm_term(problem: Problem, x) -> torch.Tensor:
    """(K,) the authors' norm of the batch-mean gradient, per generator to keep them independent."""
    cfg = problem.config
    return torch.stack([
        per_sample_grad_norm(problem.classifier, x[i], problem.labels[i], backend=cfg.grad_norm_backend,
                             mode="batch", chunk_size=cfg.grad_norm_chunk_size)
        for i in range(problem.labels.shape[0])])
