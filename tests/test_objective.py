"""The pure objective: each term equals its loss function on the generated images; generators independent."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch.func import grad, grad_and_value

from tldr_fast import conditioning, losses, objective
from tldr_fast.config import InversionConfig, ReconstructionConfig
from tldr_fast.grad_norm import per_sample_grad_norm
from tldr_fast.models import PaperCNN

SHAPE = (1, 8, 8)
TINY = {"latent_dim": 6, "generator_width": 4, "dropout": 0.0, "batch_size": 6}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    return PaperCNN(1, 10, 8, channels=(4, 8), hidden=16).eval().requires_grad_(False)


def problem_for(config, classifier):
    template, params, buffers = objective.build_generators(config, 10, SHAPE)
    labels = (
        conditioning.balanced_labels(config.batch_size, 10)
        .expand(config.num_generators, -1)
        .contiguous()
    )
    return objective.Problem(template, classifier, config, labels), params, buffers


def test_every_term_equals_its_loss_on_the_generated_images(classifier):
    cfg = ReconstructionConfig(num_generators=2, eta_pix=1.0, eps=0.05, **TINY)
    problem, params, buffers = problem_for(cfg, classifier)
    noise = objective.draw_noise(problem)
    loss, report = objective.objective(params, buffers, noise, problem)

    vectors = objective.condition(problem, noise)
    x = objective.generate(problem.template, params, buffers, noise["z"], problem.labels, vectors)
    expected_total = 0.0
    for k in range(2):
        xk, yk, ck = x[k], problem.labels[k], vectors[k]
        xp = losses.perturb(xk, cfg.eps, noise["perturb"][k])
        logits, feat = classifier.forward_with_features(xk)
        logits_p = classifier(xp)
        cos, ortho = losses.diversity_losses(feat)
        expected = {
            "kl": losses.kl(logits, ck),
            "kl_pert": losses.kl(logits_p, ck),
            "ce": losses.ce(logits, yk),
            "ce_pert": losses.ce(logits_p, yk),
            "cos": cos,
            "ortho": ortho,
            "tv": losses.total_variation(xk),
            "pix": losses.pixel_range(xk),
            "grad": per_sample_grad_norm(classifier, xk, yk).mean(),
        }
        total = sum(w * expected[t] for t, w in objective.active_terms(cfg).items())
        for term, value in expected.items():
            assert torch.allclose(report[term][k], value, rtol=1e-4, atol=1e-5), term
        assert torch.allclose(report["total"][k], total, rtol=1e-4)
        expected_total += total
    assert torch.allclose(loss, expected_total, rtol=1e-4)


def test_feature_statistics_term_equals_the_prior_on_each_batch_norm_input(classifier):
    model = copy.deepcopy(classifier)
    gen = torch.Generator().manual_seed(7)
    bn_layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in bn_layers:  # statistics unlike those of the generated images
        layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=gen))
        layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=gen) + 0.5)
    cfg = ReconstructionConfig(num_generators=2, eta_bn=0.5, **TINY)
    problem, params, buffers = problem_for(cfg, model)
    noise = objective.draw_noise(problem)
    loss, report = objective.objective(params, buffers, noise, problem)

    x = objective.generate(
        problem.template,
        params,
        buffers,
        noise["z"],
        problem.labels,
        objective.condition(problem, noise),
    )
    inputs = []
    handles = [
        m.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0]))) for m in bn_layers
    ]
    for k in range(2):
        inputs.clear()
        model(x[k])
        assert len(inputs) == len(bn_layers) == 3  # two conv blocks and the hidden layer
        expected = sum(
            losses.feature_statistics(a, m.running_mean, m.running_var) for m, a in inputs
        )
        assert torch.allclose(report["bn"][k], expected, rtol=1e-4), k
    for h in handles:
        h.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bn_layers)
    # the term reaches the generators: its gradient alone is non-zero
    only_bn = ReconstructionConfig(
        num_generators=2, **{**TINY, **{w: 0 for w in ReconstructionConfig.WEIGHTS}, "eta_bn": 1.0}
    )
    problem_bn, _, _ = problem_for(only_bn, model)
    grads = grad(lambda p: objective.objective(p, buffers, noise, problem_bn)[0])(params)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.norm()) for g in grads.values()) > 0


def test_generators_are_independent(classifier):
    """The gradient of generator 0 in a K=2 run equals its gradient when trained alone."""
    cfg2 = ReconstructionConfig(num_generators=2, **TINY)
    problem2, params2, buffers2 = problem_for(cfg2, classifier)
    noise2 = objective.draw_noise(problem2)
    grads2 = grad(lambda p: objective.objective(p, buffers2, noise2, problem2)[0])(params2)

    cfg1 = ReconstructionConfig(num_generators=1, **TINY)
    problem1, _, _ = problem_for(cfg1, classifier)
    params1 = {k: v[:1] for k, v in params2.items()}
    buffers1 = {k: v[:1] for k, v in buffers2.items()}
    noise1 = {k: v[:1] for k, v in noise2.items()}
    grads1 = grad(lambda p: objective.objective(p, buffers1, noise1, problem1)[0])(params1)
    # Some gradients are structurally zero (a convolution bias before BatchNorm): float32 leaves
    # them ~1e-7 in size, so each is compared against the whole generator's gradient as a floor.
    scale = torch.sqrt(sum(g[0].double().square().sum() for g in grads2.values()))
    for name in grads1:
        a, b = grads1[name][0].double(), grads2[name][0].double()
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-6 * float(scale), name


def test_zero_weights_are_not_computed(classifier):
    cfg = ReconstructionConfig(alpha_pert=0, beta_pert=0, eta_grad=0, eta_tv=0, eta_pix=0, **TINY)
    problem, params, buffers = problem_for(cfg, classifier)
    noise = objective.draw_noise(problem)
    assert "perturb" not in noise
    _, report = objective.objective(params, buffers, noise, problem)
    assert set(report) == {"kl", "ce", "cos", "ortho", "total"}


def test_inversion_uses_soft_vectors_whose_argmax_is_the_label(classifier):
    cfg = InversionConfig(num_generators=2, **TINY)
    problem, params, buffers = problem_for(cfg, classifier)
    noise = objective.draw_noise(problem)
    vectors = objective.condition(problem, noise)
    assert torch.equal(vectors.argmax(-1), problem.labels)
    assert float(vectors.max()) < 1
    _, report = objective.objective(params, buffers, noise, problem)
    assert set(report) == {"kl", "ce", "cos", "ortho", "total"}


def test_zero_eps_makes_the_perturbed_terms_equal_the_clean_ones(classifier):
    cfg = ReconstructionConfig(eps=0.0, **TINY)
    problem, params, buffers = problem_for(cfg, classifier)
    _, report = objective.objective(params, buffers, objective.draw_noise(problem), problem)
    assert torch.allclose(report["kl"], report["kl_pert"]) and torch.allclose(
        report["ce"], report["ce_pert"]
    )


def test_authors_batch_norm_mode(classifier):
    cfg = ReconstructionConfig.authors(num_generators=2, **TINY)
    problem, params, buffers = problem_for(cfg, classifier)
    noise = objective.draw_noise(problem)
    _, report = objective.objective(params, buffers, noise, problem)
    vectors = objective.condition(problem, noise)
    x = objective.generate(problem.template, params, buffers, noise["z"], problem.labels, vectors)
    expected = per_sample_grad_norm(classifier, x[1], problem.labels[1], mode="batch")
    assert torch.allclose(report["grad"][1], expected, rtol=1e-4)


def test_objective_is_differentiable_and_finite(classifier):
    cfg = ReconstructionConfig(**TINY)
    problem, params, buffers = problem_for(cfg, classifier)
    grads, (loss, _) = grad_and_value(
        lambda p: objective.objective(p, buffers, objective.draw_noise(problem), problem),
        has_aux=True,
    )(params)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


@pytest.mark.parametrize("features", [True, False])
def test_shared_classifier_pass_equals_separate_passes(classifier, features):
    """With ghost norms the clean images' logits, features and BatchNorm inputs come from the norms'
    own forward pass; the loss and its gradient equal those of the separate passes (vmap norms),
    in float64."""
    weights = {} if features else {"gamma": 0.0, "delta": 0.0}
    double = copy.deepcopy(classifier).double()
    grads, losses_ = [], []
    for backend in ("ghost", "vmap"):
        cfg = ReconstructionConfig(
            num_generators=2, eta_pix=1.0, eta_bn=0.5, grad_norm_backend=backend, **weights, **TINY
        )
        problem, params, buffers = problem_for(cfg, double)
        torch.manual_seed(5)
        params = {k: torch.randn_like(v, dtype=torch.float64) * 0.3 for k, v in params.items()}
        buffers = {k: v.double() if v.is_floating_point() else v for k, v in buffers.items()}
        noise = {k: v.double() for k, v in objective.draw_noise(problem).items()}
        g, (loss, report) = grad_and_value(
            partial(objective.objective, buffers=buffers, noise=noise, problem=problem),
            has_aux=True,
        )(params)
        grads.append(g)
        losses_.append((loss, report))
    (loss_a, report_a), (loss_b, report_b) = losses_
    assert set(report_a) == set(report_b)
    assert all(torch.allclose(report_a[t], report_b[t], rtol=1e-10, atol=1e-12) for t in report_a)
    # One relative error over all parameters: biases ahead of the generator's BatchNorm have a
    # gradient of zero up to rounding, so a per-tensor ratio would compare rounding with rounding.
    diff = sum(float((grads[0][n] - grads[1][n]).pow(2).sum()) for n in grads[1])
    scale = sum(float(g.pow(2).sum()) for g in grads[1].values())
    assert scale > 0 and (diff / scale) ** 0.5 < 1e-9


def _float64_problem(cfg, classifier, seed=5):
    problem, params, buffers = problem_for(cfg, copy.deepcopy(classifier).double())
    torch.manual_seed(seed)
    params = {k: torch.randn_like(v, dtype=torch.float64) * 0.3 for k, v in params.items()}
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in buffers.items()}
    noise = {k: v.double() for k, v in objective.draw_noise(problem).items()}
    return problem, params, buffers, noise


def _relative_rms(grads, reference) -> float:
    # One relative error over all parameters (biases ahead of BatchNorm have a rounding-only gradient).
    diff = sum(float((grads[n] - reference[n]).pow(2).sum()) for n in reference)
    scale = sum(float(g.pow(2).sum()) for g in reference.values())
    assert scale > 0 and set(grads) == set(reference)
    return (diff / scale) ** 0.5


@pytest.mark.parametrize(
    ("config_cls", "overrides", "chunk"),
    [
        (
            ReconstructionConfig,
            {"num_generators": 2, "eta_pix": 1.0},
            4,
        ),  # 4 + 2: a remainder chunk
        (
            ReconstructionConfig,
            {"num_generators": 1, "dropout": 0.5},
            1,
        ),  # one image per chunk, dropout on
        (ReconstructionConfig, {"num_generators": 2, "grad_norm_backend": "vmap", "gamma": 0.0}, 3),
        (
            ReconstructionConfig,
            {"num_generators": 1, "eta_grad": 0.0, "alpha_pert": 0.0, "beta_pert": 0.0},
            5,
        ),
        (InversionConfig, {"num_generators": 2}, 2),
        (ReconstructionConfig, {"num_generators": 2, "grad_norm_mode": "batch"}, 4),
        (
            ReconstructionConfig,
            {"num_generators": 1, "grad_norm_mode": "batch", "grad_norm_backend": "vmap"},
            5,
        ),
        (ReconstructionConfig, {"num_generators": 2, "eta_bn": 0.5, "eta_pix": 1.0}, 4),
        (
            ReconstructionConfig,
            {
                "num_generators": 2,
                "eta_bn": 0.5,
                "gamma": 0.0,
                "delta": 0.0,
                "grad_norm_mode": "batch",
            },
            1,
        ),
    ],
    ids=[
        "nine-terms-remainder",
        "chunk-of-one-dropout",
        "vmap-no-cosine",
        "no-grad-no-perturbation",
        "inversion",
        "authors-batch-norm",
        "authors-batch-norm-vmap",
        "feature-statistics",
        "feature-statistics-no-diversity",
    ],
)
def test_chunked_gradient_equals_the_whole_batch_gradient(classifier, config_cls, overrides, chunk):
    """chunked_grad_and_value = grad_and_value(objective) in float64: same loss, report and
    gradient, for chunks that do and do not divide the batch."""
    cfg = config_cls(**{**TINY, **overrides})
    problem, params, buffers, noise = _float64_problem(cfg, classifier)
    torch.manual_seed(7)  # generator dropout draws inside both: the same masks
    whole, (loss, report) = grad_and_value(objective.objective, has_aux=True)(
        params, buffers, noise, problem
    )
    torch.manual_seed(7)
    chunked, (chunked_loss, chunked_report) = objective.chunked_grad_and_value(
        params, buffers, noise, problem, chunk
    )
    assert torch.isfinite(chunked_loss) and torch.allclose(chunked_loss, loss, rtol=1e-12, atol=0)
    assert set(chunked_report) == set(report)
    for term in report:
        torch.testing.assert_close(
            chunked_report[term], report[term], rtol=1e-10, atol=1e-12, msg=term
        )
    assert _relative_rms(chunked, whole) < 1e-10


def test_chunked_step_is_chosen_by_the_config_and_equals_the_whole_batch_step(classifier):
    from tldr_fast.engine import AdamState, make_step

    results = []
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the step draws its noise in the default dtype
    try:
        for chunk in (None, 6, 4):  # 6 = the batch: the whole-batch path
            cfg = ReconstructionConfig(
                **{**TINY, "num_generators": 2, "classifier_chunk_size": chunk}
            )
            problem, params, buffers, _ = _float64_problem(cfg, classifier)
            torch.manual_seed(9)
            results.append(make_step(problem, buffers)(params, AdamState.zeros_like(params)))
    finally:
        torch.set_default_dtype(default_dtype)
    (_, state0, report0), (_, state1, _), (_, state2, report2) = results
    for term in report0:
        torch.testing.assert_close(report2[term], report0[term], rtol=1e-10, atol=1e-12, msg=term)
    # Adam's first moment after one step is (1 - beta1) * gradient: compare the gradients.
    assert _relative_rms(state1.m, state0.m) == 0
    assert _relative_rms(state2.m, state0.m) < 1e-10


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"classifier_chunk_size": 0}, "classifier_chunk_size must be an integer >= 1, got 0"),
        (
            {"grad_norm_backend": "loop"},
            r"grad_norm_backend must be one of \('auto', 'ghost', 'vmap'\), got 'loop'",
        ),
    ],
)
def test_config_refuses_what_the_engine_cannot_run(overrides, match):
    with pytest.raises(ValueError, match=match):
        ReconstructionConfig(**{**TINY, **overrides})


def test_cli_classifier_chunk_size_flag():
    import argparse

    from tldr_fast.cli.engine import _add_engine_arguments, _config

    parser = argparse.ArgumentParser()
    _add_engine_arguments(parser, "reconstruct")
    assert _config(parser.parse_args([]), ReconstructionConfig).classifier_chunk_size is None
    args = parser.parse_args(["--batch-size", "4096", "--classifier-chunk-size", "1024"])
    assert _config(args, ReconstructionConfig).classifier_chunk_size == 1024


@pytest.mark.cuda
@pytest.mark.parametrize("grad_norm_mode", ["per_sample", "batch"])
def test_chunked_gradient_equals_the_whole_batch_gradient_on_cuda(grad_norm_mode):
    # float32 on the GPU: the diversity and TV/pixel losses run as Triton kernels inside the chunked
    # step's torch.func transforms.
    torch.manual_seed(1)
    classifier = PaperCNN(1, 10, 8, channels=(4, 8), hidden=16).cuda().eval().requires_grad_(False)
    cfg = ReconstructionConfig(
        **{
            **TINY,
            "batch_size": 64,
            "num_generators": 2,
            "eta_pix": 1.0,
            "grad_norm_mode": grad_norm_mode,
        }
    )
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE, "cuda")
    labels = conditioning.balanced_labels(64, 10, "cuda").expand(2, -1).contiguous()
    problem = objective.Problem(template, classifier, cfg, labels)
    noise = objective.draw_noise(problem)
    whole, (loss, report) = grad_and_value(objective.objective, has_aux=True)(
        params, buffers, noise, problem
    )
    chunked, (chunked_loss, chunked_report) = objective.chunked_grad_and_value(
        params, buffers, noise, problem, 24
    )
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    for term in report:
        torch.testing.assert_close(
            chunked_report[term], report[term], rtol=1e-4, atol=1e-6, msg=term
        )
    assert _relative_rms(chunked, whole) < 1e-4
