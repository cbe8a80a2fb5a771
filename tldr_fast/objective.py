"""The TLDR objective as one pure function of the stacked generator parameters.

For K generators with parameters theta_k, each with its own batch of B images x_k = G_k(z_k, c_k):

    L(theta) = sum_k [ alpha KL(c_k || f(x_k)) + alpha' KL(c_k || f(x'_k)) + beta CE(f(x_k), y_k)
                       + beta' CE(f(x'_k), y_k) + gamma Cos(phi(x_k)) + delta Ortho(phi(x_k))
                       + eta1 TV(x_k) + eta2 Pix(x_k) + eta3 mean_i ||grad_w CE(f(x_ki), y_ki)||
                       + eta_bn sum_l BN_l(x_k) + eta_kkt R_k(x_k, lambda_k) ]

with f the frozen classifier's logits, phi its penultimate features, x' = perturb(x) and BN_l the
feature-statistics prior at the classifier's BatchNorm layer l (beyond the paper; off by
default). R_k is the KKT residual of the classifier's weights against generator k's batch, with
learnable multipliers lambda_k (`_kkt_combinations`; beyond the paper, off by default). Summing
over k keeps the generators independent: each theta_k receives exactly the gradient of its own
objective. Terms whose weight is zero are not computed (a static decision from the config).

`objective` has no side effects and no host synchronisation: the noise it consumes is an argument,
drawn by `draw_noise` inside the training step, so the whole step can be traced by torch.compile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vjp, vmap

from tldr_fast import conditioning, distributed, losses, sharded_generator
from tldr_fast.attacks import kkt
from tldr_fast.config import _EngineConfig
from tldr_fast.grad_norm import batch_mean_gradient, per_sample_grad_norm_and_forward, safe_sqrt
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
    "kkt": "eta_kkt",
}

# The trainable state's entry for the KKT term's free multiplier parameters rho (K, B), present when
# eta_kkt > 0: updated by the same Adam step as the generators' parameters, never given to them.
KKT_MULTIPLIERS = "kkt_multipliers"


def active_terms(config: _EngineConfig) -> dict[str, float]:
    """term -> weight for the terms of this config with a non-zero weight, in equation order."""
    weights = config.weights()
    return {
        term: weights[field] for term, field in TERM_WEIGHTS.items() if weights.get(field, 0.0) > 0
    }


def batch_norm_layers(classifier: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The classifier's BatchNorm layers that hold running statistics, in module order."""
    return [
        m
        for m in classifier.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
    ]


def needs_features(config: _EngineConfig) -> bool:
    """Whether the objective reads the classifier's penultimate features (the diversity terms)."""
    terms = active_terms(config)
    return "cos" in terms or "ortho" in terms


@dataclass(frozen=True)
class Problem:
    """Everything static about a run: the generator template, the frozen classifier and the labels."""

    template: (
        Generator  # parameters live on the meta device; the values come from the stacked state
    )
    classifier: nn.Module
    config: _EngineConfig
    labels: torch.Tensor  # (K, B) int64: each generator's fixed, balanced conditioning labels
    shard: distributed.Shard | None = None  # data-parallel: this rank's images of each batch
    # The module the training step runs: the template, or on a data-parallel rank its copy that
    # computes the rank's images of each batch (`sharded_generator.shard_generator`). Built here,
    # not lazily: a first access inside a compiled step would have Dynamo trace the lazy
    # property's lock.
    generator: Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        generator = (
            self.template
            if self.shard is None
            else sharded_generator.shard_generator(self.template, self.shard)
        )
        object.__setattr__(self, "generator", generator)

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
    """K freshly initialised generators, seeded from config.seed: (meta template, trainable params,
    buffers). The trainable params are the generators' stacked parameters and, with eta_kkt > 0,
    the KKT multipliers' free parameters (KKT_MULTIPLIERS: (K, B), every lambda at
    kkt_lambda_init); `generator_parameters` takes the generators' part."""
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
    if "kkt" in active_terms(config):
        params[KKT_MULTIPLIERS] = torch.full(
            (config.num_generators, config.batch_size),
            kkt.free_for(config.kkt_lambda_init, config.kkt_lambda_min),
            device=device,
        )
    return template, params, buffers


def generator_parameters(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generators' stacked parameters of the trainable params (without the KKT multipliers)."""
    return {name: value for name, value in params.items() if name != KKT_MULTIPLIERS}


def kkt_lambdas(params: dict[str, torch.Tensor], config: _EngineConfig) -> torch.Tensor | None:
    """The KKT multipliers lambda (K, B) of the trainable params, None when the term is off."""
    free = params.get(KKT_MULTIPLIERS)
    return None if free is None else kkt.lambdas_from(free, config.kkt_lambda_min)


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


def _bn_channel_sums(bn_layers, bn_inputs, k: int):
    """Per layer: (K, C) sums of d and of d^2, d = the clean images' input minus the running mean."""
    sums = []
    for layer, a in zip(bn_layers, bn_inputs, strict=True):
        per_generator = a.unflatten(0, (k, -1))
        sums.append(
            vmap(losses.shifted_channel_sums, in_dims=(0, None))(per_generator, layer.running_mean)
        )
    return sums


def _feature_statistics_from_sums(bn_layers, counts, sums) -> dict[str, torch.Tensor]:
    """{bn: (K,)} the feature-statistics prior of the whole batch from its channel sums."""
    total = 0
    for layer, count, (s1, s2) in zip(bn_layers, counts, sums, strict=True):
        total = total + vmap(
            losses.feature_statistics_from_sums, in_dims=(0, 0, None, None, None, None)
        )(s1, s2, count, layer.running_mean, layer.running_mean, layer.running_var)
    return {"bn": total}


def _classifier_terms(problem: Problem, x, labels, vectors, perturb_noise, bn_layers):
    """({term: (K,)}, extras) for the terms that are means of per-image values over the given images
    x (K, n, C, H, W): KL, CE, both on the perturbed images, and the per-sample gradient norm; extras
    of the clean images' classifier pass (`_classify`)."""
    cfg, terms = problem.config, problem.terms
    k, n = labels.shape
    flat_x, flat_y = x.flatten(0, 1), labels.flatten()
    classify = partial(_classify, problem.classifier, problem.needs_features, bn_layers)
    perturbed = (
        losses.perturb(flat_x, cfg.eps, perturb_noise.flatten(0, 1))
        if problem.needs_perturbation
        else None
    )
    values: dict[str, torch.Tensor] = {}
    if "grad" in terms and cfg.grad_norm_mode == "per_sample":
        # The norms' own forward pass on the clean images also gives their logits and features.
        norms, (logits, extras) = per_sample_grad_norm_and_forward(
            problem.classifier,
            flat_x,
            flat_y,
            classify,
            backend=cfg.grad_norm_backend,
            chunk_size=cfg.grad_norm_chunk_size,
        )
        values["grad"] = norms.view(k, n).mean(1)
        if perturbed is not None:
            logits = torch.cat([logits, problem.classifier(perturbed)])
    else:
        # Clean and perturbed images share one classifier pass (eval-mode BN: samples independent).
        logits, extras = classify(flat_x if perturbed is None else torch.cat([flat_x, perturbed]))
    logits = logits.view(-1, k, n, logits.shape[-1])  # (1 or 2, K, n, N): clean, then perturbed
    if "kl" in terms:
        values["kl"] = vmap(losses.kl)(logits[0], vectors)
    if "kl_pert" in terms:
        values["kl_pert"] = vmap(losses.kl)(logits[1], vectors)
    if "ce" in terms:
        values["ce"] = vmap(losses.ce)(logits[0], labels)
    if "ce_pert" in terms:
        values["ce_pert"] = vmap(losses.ce)(logits[1], labels)
    return values, extras


def _statistics(problem: Problem, bn_layers, x, labels, extras, share: float, free=None):
    """(statistics, positions) of the clean images x (K, n, C, H, W), n = share * B of the batch,
    from their classifier pass `extras`: what the whole-batch terms are functions of.
    statistics: "feat" (K, n, D) the penultimate features; "bn" per BatchNorm layer the (K, C)
    sums of d and d^2 (`_bn_channel_sums`); "grad" per generator share * the mean gradient over
    the n images (the graph to x kept); "kkt" per generator the n images' part of the KKT
    combination S_k (`_kkt_combinations`, free (K, n) their multipliers' free parameters; the
    graph to x and free kept). "feat" is per image (chunks concatenate it), the others are
    additive over chunks. positions: values per channel per image at each BatchNorm input."""
    k, n = labels.shape
    stats: dict[str, object] = {}
    if problem.needs_features:
        stats["feat"] = extras["feat"][: k * n].view(k, n, -1)  # perturbed rows may follow
        if problem.shard is not None:  # ranks combine the diversity losses' additive sums
            stats["div"] = distributed.diversity_sums(
                stats.pop("feat"), problem.config.ortho_normalized
            )
    if bn_layers:
        stats["bn"] = _bn_channel_sums(bn_layers, [a[: k * n] for a in extras["bn"]], k)
    if _batch_grad_norm(problem):
        stats["grad"] = _mean_gradients(problem, x, labels, share)
    if "kkt" in problem.terms:
        stats["kkt"] = _kkt_combinations(problem, x, labels, free)
    return stats, [a[0, 0].numel() for a in extras["bn"]]


def _batch_terms(problem: Problem, bn_layers, counts, stats) -> dict[str, torch.Tensor]:
    """{term: (K,)} for the terms that compare the whole batch, from its `_statistics`: the
    diversity losses of the features (one call over the K generators: one kernel launch), the
    feature-statistics prior from the channel sums (counts: values per channel in the batch), the
    authors' norm of the batch-mean gradient and the KKT residual ||theta - S_k||^2 / ||theta||^2."""
    values: dict[str, torch.Tensor] = {}
    if "feat" in stats:
        values["cos"], values["ortho"] = losses.stacked_diversity_losses(
            stats["feat"], normalized=problem.config.ortho_normalized, impl=problem.config.impl
        )
    if "div" in stats:
        values["cos"], values["ortho"] = distributed.diversity_from_sums(
            stats["div"], problem.labels.shape[1]
        )
    if "bn" in stats:
        values.update(_feature_statistics_from_sums(bn_layers, counts, stats["bn"]))
    if "grad" in stats:
        values["grad"] = torch.stack(
            [safe_sqrt(sum(g.pow(2).sum() for g in grads)) for grads in stats["grad"]]
        )
    if "kkt" in stats:
        theta, _ = _classifier_state(problem.classifier)
        squared_norm = sum(p.pow(2).sum() for p in theta.values())
        values["kkt"] = torch.stack(
            [
                kkt.residual(theta, dict(zip(theta, combination, strict=True))) / squared_norm
                for combination in stats["kkt"]
            ]
        )
    return values


def _image_terms(problem: Problem, x) -> dict[str, torch.Tensor]:
    """{tv, pix}: (K,) each, from the images (K, B, C, H, W), in one call (one kernel launch)."""
    tv, pix = losses.stacked_tv_pixel(x, impl=problem.config.impl)
    return {"tv": tv, "pix": pix}


def _batch_grad_norm(problem: Problem) -> bool:
    return "grad" in problem.terms and problem.config.grad_norm_mode == "batch"


def _weighted_sum(problem: Problem, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """(K,) sum over the active terms present in `values` of weight * value."""
    return sum(weight * values[term] for term, weight in problem.terms.items() if term in values)


def _weighted_grad(problem: Problem, term_values, inputs):
    """(d/d inputs of the summed weighted terms, the terms): term_values(inputs) -> {term: (K,)}."""

    def loss(v):
        values = term_values(v)
        return _weighted_sum(problem, values).sum(), values

    return grad(loss, has_aux=True)(inputs)


def _per_generator(gradient, scale: float, *batches):
    """Per generator k: the tensors of gradient(batches[0][k], batches[1][k], ...), times scale."""
    return [tuple(scale * g for g in gradient(*per_k)) for per_k in zip(*batches, strict=True)]


def _mean_gradients(problem: Problem, x, labels, share: float):
    """Per generator k: share * grad_theta of the mean CE of the classifier over x[k] (graph to x kept)."""
    cfg = problem.config
    gradient = partial(
        batch_mean_gradient,
        problem.classifier,
        backend=cfg.grad_norm_backend,
        chunk_size=cfg.grad_norm_chunk_size,
    )
    return _per_generator(gradient, share, x, labels)


def _classifier_state(classifier: nn.Module):
    """(theta, buffers): every parameter of the classifier (frozen or not), detached, and its
    buffers. The KKT term takes the margins at theta itself, not at theta / ||theta|| as the attack
    does: at the unit-norm weights a target with biases and BatchNorm has logits that hardly depend
    on the image; `_batch_terms` divides the residual by ||theta||^2 instead, so that it is
    relative (1 at lambda = 0) like the attack's."""
    return {k: p.detach() for k, p in classifier.named_parameters()}, dict(
        classifier.named_buffers()
    )


def _kkt_combinations(problem: Problem, x, labels, free):
    """Per generator k: (N / B) sum_i lambda_ki grad_theta phi(x_ki; theta) over the given images
    x (K, n, C, H, W), lambda = kkt_lambda_min + softplus(free), free (K, n) (graph to x and free
    kept), one tensor per classifier parameter; phi = f_y - max_{j != y} f_j (`kkt.margins`).

    Summed over the batch's chunks (and ranks) this is S_k, generator k's estimate of the KKT
    combination sum_j lambda_j grad phi(x_j; theta) over a training set of N = kkt_train_size
    images (None: N = B): the B images stand for the N training images, each batch position i
    (fixed label y_i) for N / B of them with one multiplier, so lambda_ki is a multiplier per
    training image, on the scale of the KKT attack's.
    """
    cfg = problem.config
    theta, buffers = _classifier_state(problem.classifier)
    lam = kkt.lambdas_from(free, cfg.kkt_lambda_min)
    b = problem.labels.shape[1]
    scale = (cfg.kkt_train_size or b) / b

    def combination(x_k, y_k, lam_k):
        return tuple(
            kkt.margin_combination(problem.classifier, theta, buffers, x_k, y_k, lam_k).values()
        )

    return _per_generator(combination, scale, x, labels, lam)


def _report(problem: Problem, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    report = {term: values[term].detach() for term in values}
    report["total"] = _weighted_sum(problem, values).detach()
    return report


def _chunk_terms(problem: Problem, x, vectors, perturb_noise, bn_layers, s: int, e: int, free=None):
    """(share-weighted per-image terms, statistics, positions) of images s:e of each generator's
    batch, x (K, e - s, C, H, W): share = (e - s) / B, so the per-image terms of all chunks sum to
    the batch means. One classifier pass of the clean (and perturbed) images. free: the whole
    batch's KKT multipliers' free parameters (K, B) when the KKT term is on."""
    share = (e - s) / problem.labels.shape[1]
    labels = problem.labels[:, s:e]
    values, extras = _classifier_terms(
        problem,
        x,
        labels,
        vectors[:, s:e],
        None if perturb_noise is None else perturb_noise[:, s:e],
        bn_layers,
    )
    stats, positions = _statistics(
        problem, bn_layers, x, labels, extras, share, None if free is None else free[:, s:e]
    )
    return {term: share * value for term, value in values.items()}, stats, positions


def objective(params, buffers, noise, problem: Problem):
    """(scalar loss summed over generators, {term: (K,) detached values, 'total': (K,)})."""
    b = problem.labels.shape[1]
    vectors = condition(problem, noise)
    x = _generate_local(problem, generator_parameters(params), buffers, noise, vectors)
    bn_layers = batch_norm_layers(problem.classifier) if "bn" in problem.terms else []
    s, e = _local_range(problem)
    values, stats, positions = _chunk_terms(
        problem, x, vectors, noise.get("perturb"), bn_layers, s, e, params.get(KKT_MULTIPLIERS)
    )
    batch_values = _batch_terms(
        problem,
        bn_layers,
        [b * p for p in positions],
        distributed.sum_statistics(problem.shard, stats),
    )
    values.update(batch_values)
    if "tv" in problem.terms or "pix" in problem.terms:
        values.update(_local_image_terms(problem, x))
    return _weighted_sum(problem, values).sum(), _report(
        problem, distributed.report_shares(problem.shard, values, batch_values)
    )


def chunked_grad_and_value(params, buffers, noise, problem: Problem, chunk_size: int):
    """`grad_and_value(objective, has_aux=True)`, with the classifier run on chunks of at most
    chunk_size images per generator, so the memory of its passes and of the gradient norm's double
    backward is bounded by the chunk, not the batch.

    The terms are the objective's: L = sum_c S_c(x_c) + T(sum_c sigma_c(x_c)) + I(x), with S_c the
    share-weighted per-image terms of chunk c, sigma_c its statistics and T the whole-batch terms
    of their combination (`_statistics`, `_batch_terms`), I the image priors. dL/dx is assembled
    chunk by chunk: the statistics of the whole batch first (a forward pass, no graph kept), then
    h = dT/dsigma by autograd, then for each chunk the gradient of S_c(x_c) + <h, sigma_c(x_c)>
    (h sliced to the chunk for the per-image features), whose graph is freed before the next
    chunk. The generator runs once over all of the process's images (its BatchNorm couples them)
    and dL/dx is pulled back through it in one vector-Jacobian product. The KKT multipliers enter
    only the chunks' statistics: their gradient is the sum of the chunks' (each zero outside its
    chunk).
    """
    b = problem.labels.shape[1]
    vectors = condition(problem, noise)
    x, pull_back = vjp(
        lambda p: _generate_local(problem, p, buffers, noise, vectors), generator_parameters(params)
    )
    free = params.get(KKT_MULTIPLIERS)
    multipliers = {} if free is None else {KKT_MULTIPLIERS: free}
    first, stop = _local_range(problem)
    chunks = [(s, min(s + chunk_size, stop)) for s in range(first, stop, chunk_size)]
    perturb_noise = noise.get("perturb")
    bn_layers = batch_norm_layers(problem.classifier) if "bn" in problem.terms else []
    values: dict[str, torch.Tensor] = {}
    x_grad = torch.zeros_like(x)
    if "tv" in problem.terms or "pix" in problem.terms:
        x_grad, image_values = _weighted_grad(problem, partial(_local_image_terms, problem), x)
        values.update(image_values)
    stats_grad, batch_values = None, {}
    if problem.needs_features or bn_layers or _batch_grad_norm(problem) or free is not None:
        parts = []
        for s, e in chunks:
            x_c = x[:, s - first : e - first]
            _, extras = _classify(
                problem.classifier, problem.needs_features, bn_layers, x_c.flatten(0, 1)
            )
            parts.append(
                _statistics(
                    problem,
                    bn_layers,
                    x_c,
                    problem.labels[:, s:e],
                    extras,
                    (e - s) / b,
                    None if free is None else free[:, s:e],
                )
            )
        stats = distributed.sum_statistics(problem.shard, _combine([part for part, _ in parts]))
        counts = [b * p for p in parts[0][1]]
        stats_grad, batch_values = _weighted_grad(
            problem, partial(_batch_terms, problem, bn_layers, counts), stats
        )
        values.update(batch_values)

    def chunk_loss(inputs, s, e):
        chunk_values, stats_c, _ = _chunk_terms(
            problem,
            inputs["x"],
            vectors,
            perturb_noise,
            bn_layers,
            s,
            e,
            inputs.get(KKT_MULTIPLIERS),
        )
        # No per-image term is on when only whole-batch terms are (eta_kkt or eta_bn alone).
        loss = _weighted_sum(problem, chunk_values).sum() if chunk_values else 0
        if stats_grad is not None:
            loss = loss + _inner(_slice_per_image(stats_grad, s, e), stats_c)
        return loss, chunk_values

    x_chunk_grads, multiplier_grads = [], {}
    for s, e in chunks:
        x_c = x[:, s - first : e - first]
        g, chunk_values = grad(chunk_loss, has_aux=True)({**multipliers, "x": x_c}, s, e)
        x_chunk_grads.append(g.pop("x"))
        _accumulate(multiplier_grads, g)  # each chunk's is zero outside its images
        _accumulate(values, chunk_values)
    (param_grads,) = pull_back(x_grad + torch.cat(x_chunk_grads, dim=1))
    return {**param_grads, **multiplier_grads}, (
        _weighted_sum(problem, values).sum().detach(),
        _report(problem, distributed.report_shares(problem.shard, values, batch_values)),
    )


def _accumulate(totals: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
    """totals[name] += parts[name] for every name of parts (set where totals has none yet)."""
    for name, value in parts.items():
        totals[name] = totals[name] + value if name in totals else value


# Statistics of each image (chunks concatenate them along the batch dim); the others add up.
_PER_IMAGE_STATISTICS = ("feat",)


def _combine(parts):
    """The whole batch's statistics from its chunks' (`_statistics`)."""
    return {
        name: torch.cat([p[name] for p in parts], dim=1)
        if name in _PER_IMAGE_STATISTICS
        else _tree_sum([p[name] for p in parts])
        for name in parts[0]
    }


def _tree_sum(trees):
    if isinstance(trees[0], torch.Tensor):
        return sum(trees)
    return type(trees[0])(_tree_sum(list(leaves)) for leaves in zip(*trees, strict=True))


def _slice_per_image(stats, s: int, e: int):
    return {
        name: value[:, s:e] if name in _PER_IMAGE_STATISTICS else value
        for name, value in stats.items()
    }


def _inner(a, b) -> torch.Tensor:
    """Sum over matching tensors of two statistics trees of <a, b> (the linearised batch terms)."""
    if isinstance(a, torch.Tensor):
        return (a * b).sum()
    pairs = (
        zip(a.values(), b.values(), strict=True) if isinstance(a, dict) else zip(a, b, strict=True)
    )
    return sum(_inner(x, y) for x, y in pairs)


# -- data-parallel: this rank's images (problem.shard; all of them in a single process) ------------


def _local_range(problem: Problem) -> tuple[int, int]:
    """[start, stop) of this rank's images of each generator's batch."""
    shard = problem.shard
    return (0, problem.labels.shape[1]) if shard is None else (shard.start, shard.stop)


def _generate_local(problem: Problem, params, buffers, noise, vectors) -> torch.Tensor:
    """This rank's images (K, stop - start, C, H, W) of each generator's batch, from the global
    batch's noise and conditioning vectors (K, B, ...): all B in a single process."""
    s, e = _local_range(problem)
    return generate(
        problem.generator,
        params,
        buffers,
        noise["z"][:, s:e],
        problem.labels[:, s:e],
        vectors[:, s:e],
    )


def _local_image_terms(problem: Problem, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`_image_terms` of this rank's images x, weighted by their share of the batch."""
    values = _image_terms(problem, x)
    if problem.shard is None:
        return values
    share = (problem.shard.stop - problem.shard.start) / problem.labels.shape[1]
    return {term: share * value for term, value in values.items()}


def grad_and_report(params, buffers, noise, problem: Problem):
    """(dL/dparams, (L, report)) of `objective`, the training step's gradient: the whole batch in
    one pass, or `chunked_grad_and_value` when config.classifier_chunk_size is below the batch."""
    chunk = problem.config.classifier_chunk_size
    if chunk is not None and chunk < problem.labels.shape[1]:
        return chunked_grad_and_value(params, buffers, noise, problem, chunk)
    return grad_and_value(objective, has_aux=True)(params, buffers, noise, problem)
