"""The compiled step: one graph (fullgraph), equal to the eager step from the same state and seed;
on CUDA, graph replay equal to eager and free of host synchronisation. The naive benchmark
reference computes the same objective as the engine."""

from __future__ import annotations

import argparse
import collections
import functools

import pytest
import torch

from bench.naive_step import naive_terms
from tldr_fast import conditioning, engine, objective
from tldr_fast.compiled import CompiledStep
from tldr_fast.config import ReconstructionConfig
from tldr_fast.engine import AdamState, make_step
from tldr_fast.kernels import diversity as kdiv
from tldr_fast.kernels import tv_pixel as ktv
from tldr_fast.models import PaperCNN

SHAPE = (1, 8, 8)
# All nine terms on (eta_pix is 0 in the presets), dropout on so the generator's random masks are
# part of what must match.
TINY = {
    "num_generators": 2,
    "batch_size": 6,
    "latent_dim": 6,
    "generator_width": 4,
    "eta_pix": 1.0,
    "eps": 0.05,
    "steps": 2,
    "log_every": 1,
}


def tiny_classifier(device="cpu"):
    torch.manual_seed(1)
    return PaperCNN(1, 10, 8, channels=(4, 8), hidden=16).to(device).eval().requires_grad_(False)


def tiny_step(device="cpu", **overrides):
    cfg = ReconstructionConfig(**{**TINY, **overrides})
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE, device)
    labels = (
        conditioning.balanced_labels(cfg.batch_size, 10, device)
        .expand(cfg.num_generators, -1)
        .contiguous()
    )
    problem = objective.Problem(template, tiny_classifier(device), cfg, labels)
    return make_step(problem, buffers), params


def run_steps(step, params, steps: int, seed: int = 3):
    torch.manual_seed(seed)
    state = AdamState.zeros_like(params)
    reports = []
    for _ in range(steps):
        params, state, report = step(params, state)
        params = {
            k: v.clone() for k, v in params.items()
        }  # CUDA graph buffers change on the next call
        reports.append(report)
    return params, state, reports


def assert_same_trajectory(eager, compiled, lr: float, rtol=1e-4, atol=1e-5):
    (p0, s0, r0), (p1, s1, r1) = eager, compiled
    for a, b in zip(r0, r1, strict=True):
        assert a.keys() == b.keys()
        for term in a:
            torch.testing.assert_close(b[term], a[term], rtol=rtol, atol=atol, msg=term)
    for name in s0.m:
        torch.testing.assert_close(s1.m[name], s0.m[name], rtol=rtol, atol=atol)
        # v is a mean of squared gradients: a relative error r in g is 2r in v.
        torch.testing.assert_close(s1.v[name], s0.v[name], rtol=2 * rtol, atol=atol**2)
    # Adam's update m/sqrt(v) is ill-conditioned where the gradient is ~0 (dropped units, a conv
    # bias followed by BatchNorm, whose gradient is zero but for rounding): there float noise may
    # flip it by up to one lr per step; elsewhere it must agree. "~0" is relative to the largest
    # gradient of any parameter, not of the same tensor (a whole tensor can be rounding noise).
    grad_scale = max(float(v.sqrt().max()) for v in s0.v.values())
    for name in p0:
        diff = (p1[name] - p0[name]).abs()
        assert diff.max() <= 2 * lr * len(r0) + 1e-6, name
        well_conditioned = s0.v[name].sqrt() > 1e-3 * grad_scale
        torch.testing.assert_close(
            p1[name][well_conditioned], p0[name][well_conditioned], rtol=rtol, atol=atol
        )


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"eta_bn": 0.5},
        {"classifier_chunk_size": 4},
        {"classifier_chunk_size": 4, "grad_norm_mode": "batch", "eta_bn": 0.5},
        {"eta_kkt": 1.0},
    ],
    ids=[
        "nine-terms",
        "with-feature-statistics",
        "classifier-chunks",
        "classifier-chunks-batch-norm-statistics",
        "with-kkt-term",
    ],
)
def test_step_compiles_as_one_graph_and_equals_eager(overrides):
    # fullgraph=True raises on any graph break; aot_eager traces exactly what inductor would get.
    step, params = tiny_step(**overrides)
    eager = run_steps(step, params, 2)
    compiled_step = CompiledStep(step, backend="aot_eager")
    compiled = run_steps(compiled_step, params, 2)
    assert compiled_step.compile_seconds > 0
    assert_same_trajectory(eager, compiled, lr=TINY.get("lr", 3e-3))


@pytest.mark.compile
@pytest.mark.slow
def test_inductor_step_equals_eager():
    step, params = tiny_step()
    eager = run_steps(step, params, 2)
    compiled = run_steps(CompiledStep(step), params, 2)
    assert_same_trajectory(eager, compiled, lr=3e-3)


@pytest.mark.compile
@pytest.mark.slow
def test_engine_compile_flag_gives_the_eager_history(monkeypatch):
    classifier = tiny_classifier()
    eager = engine.train(classifier, 10, SHAPE, ReconstructionConfig(**TINY), progress=False)
    monkeypatch.setattr(
        engine, "CompiledStep", functools.partial(CompiledStep, backend="aot_eager")
    )
    compiled = engine.train(
        classifier, 10, SHAPE, ReconstructionConfig(**TINY, compile=True), progress=False
    )
    assert eager.compile_seconds is None and compiled.compile_seconds > 0
    for term, values in eager.history.items():
        assert compiled.history[term] == pytest.approx(values, rel=1e-4, abs=1e-5), term


class _CountedKernel:
    """A Triton kernel whose launches (kernel[grid](...)) are counted by name."""

    def __init__(self, kernel, name: str, counts: collections.Counter):
        self._kernel, self._name, self._counts = kernel, name, counts

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def counted(*args, **kwargs):
            self._counts[self._name] += 1
            return launch(*args, **kwargs)

        return counted


@pytest.fixture
def kernel_launches(monkeypatch):
    counts = collections.Counter()
    for module, names in (
        (kdiv, ("_row_norms_kernel", "_gram_kernel", "_grad_kernel")),
        (ktv, ("_tv_pixel_kernel",)),
    ):
        for name in names:
            monkeypatch.setattr(module, name, _CountedKernel(getattr(module, name), name, counts))
    return counts


# Per step, for all K generators at once: diversity forward (row norms, Gram) and backward, TV/pixel
# forward and backward.
LAUNCHES_PER_STEP = {
    "_row_norms_kernel": 1,
    "_gram_kernel": 1,
    "_grad_kernel": 1,
    "_tv_pixel_kernel": 2,
}


@pytest.mark.compile
@pytest.mark.triton
@pytest.mark.parametrize(
    "overrides",
    [
        {"num_generators": 1},
        {"num_generators": 3, "classifier_chunk_size": 4, "grad_norm_mode": "batch"},
    ],
    ids=["one-generator", "three-generators-classifier-chunks-batch-norm"],
)
def test_compiled_step_launches_the_kernels_and_equals_the_eager_torch_step(
    overrides, kernel_launches
):
    # Nine terms, eta_grad > 0 included (its double backward runs beside the kernels' first-order
    # backward). The kernels are opaque ops in the one graph: each step launches them on the
    # stacked generators, and the trajectory is the eager torch path's.
    steps = 3
    eager = run_steps(*tiny_step(impl="torch", **overrides), steps)
    assert not kernel_launches
    step, params = tiny_step(impl="triton", **overrides)
    compiled_step = CompiledStep(step, backend="aot_eager")
    torch.manual_seed(3)
    state, reports, per_step = AdamState.zeros_like(params), [], []
    for _ in range(steps):
        before = collections.Counter(kernel_launches)
        params, state, report = compiled_step(params, state)
        reports.append(report)
        per_step.append(dict(kernel_launches - before))
    assert per_step == [LAUNCHES_PER_STEP] * steps
    # Kernels and torch sum in different orders (each loss agrees to ~1e-5 of its scale): after
    # three Adam steps the second moments of the smallest gradient entries differ by ~5e-4
    # relative, so the tolerance is the one CUDA's eager and compiled steps are held to.
    assert_same_trajectory(eager, (params, state, reports), lr=3e-3, rtol=1e-3, atol=1e-4)


def test_recompile_limit_is_raised_through_the_public_config():
    from tldr_fast.compiled import RECOMPILE_LIMIT

    default = torch._dynamo.config.recompile_limit
    with torch.compiler.config.patch(recompile_limit=RECOMPILE_LIMIT):
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    assert torch._dynamo.config.recompile_limit == default


def test_compile_field_is_a_bool():
    with pytest.raises(ValueError, match="compile must be True or False, got 'yes'"):
        ReconstructionConfig(compile="yes")


def test_cli_compile_flags():
    from tldr_fast.cli.engine import _add_engine_arguments, _config

    parser = argparse.ArgumentParser()
    _add_engine_arguments(parser, "reconstruct")
    for flags, expected in (([], False), (["--compile"], True), (["--no-compile"], False)):
        assert _config(parser.parse_args(flags), ReconstructionConfig).compile is expected


def test_cuda_graph_needs_cuda_parameters():
    step, params = tiny_step()
    with pytest.raises(ValueError, match="cuda_graph=True needs parameters on a CUDA device"):
        CompiledStep(step, cuda_graph=True)(params, AdamState.zeros_like(params))


def test_naive_reference_computes_the_engine_objective():
    # The benchmark's speedups compare like with like: same nine terms, same values.
    cfg = ReconstructionConfig(**{**TINY, "num_generators": 1, "dropout": 0.0})
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE)
    classifier = tiny_classifier()
    labels = conditioning.balanced_labels(cfg.batch_size, 10)
    problem = objective.Problem(template, classifier, cfg, labels[None])
    noise = objective.draw_noise(problem)
    _, report = objective.objective(params, buffers, noise, problem)
    generator = objective.make_generator(cfg, 10, SHAPE)
    generator.load_state_dict({k: v[0] for k, v in {**params, **buffers}.items()})
    naive = naive_terms(generator, classifier, cfg, labels, noise["z"][0], noise["perturb"][0])
    for term, value in naive.items():
        torch.testing.assert_close(value, report[term][0], rtol=1e-4, atol=1e-5, msg=term)


# -- CUDA (skipped without a GPU) ----------------------------------------------------------------


@pytest.fixture
def full_precision_convs(monkeypatch):
    # TF32 convolutions (the cuDNN default) may pick different algorithms eager and compiled.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.cuda
@pytest.mark.compile
def test_cuda_graph_replay_equals_the_compiled_step(full_precision_convs):
    # The capture itself must be exact: replaying the graph gives what the compiled step gives.
    step, params = tiny_step("cuda")
    plain = run_steps(CompiledStep(step, cuda_graph=False), params, 4)
    compiled_step = CompiledStep(step)
    replayed = run_steps(compiled_step, params, 4)  # compile, capture + replay, replay, replay
    assert compiled_step._graph is not None
    assert_same_trajectory(plain, replayed, lr=3e-3)


@pytest.mark.cuda
@pytest.mark.compile
@pytest.mark.xfail(
    strict=True,
    reason="measured on an H100 (torch 2.11): Inductor's CUDA code draws other random numbers than "
    "eager even with fallback_random (aot_eager and the CUDA graph of the compiled step are exact), "
    "so compiled and eager CUDA trajectories differ in their noise; equal on CPU",
)
def test_cuda_graph_replay_equals_eager(full_precision_convs):
    step, params = tiny_step("cuda")
    eager = run_steps(step, params, 4)
    compiled_step = CompiledStep(step)
    compiled = run_steps(compiled_step, params, 4)  # compile, capture + replay, replay, replay
    assert compiled_step._graph is not None
    assert_same_trajectory(eager, compiled, lr=3e-3, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.compile
@pytest.mark.triton
def test_cuda_graph_replay_with_the_kernels_equals_eager(full_precision_convs):
    # aot_eager: the same single graph without Inductor's code (whose CUDA random numbers differ
    # from eager's, above), captured and replayed with the Triton launches and the Adam update.
    step, params = tiny_step("cuda", impl="triton")
    eager = run_steps(step, params, 4)
    compiled_step = CompiledStep(step, backend="aot_eager")
    replayed = run_steps(compiled_step, params, 4)  # compile, capture + replay, replay, replay
    assert compiled_step._graph is not None
    assert_same_trajectory(eager, replayed, lr=3e-3, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.compile
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_replayed_step_makes_no_host_sync(impl):
    step, params = tiny_step("cuda", impl=impl)
    compiled_step = CompiledStep(step)
    state = AdamState.zeros_like(params)
    for _ in range(2):  # compile, then capture
        params, state, _ = compiled_step(params, state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            params, state, report = compiled_step(params, state)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(report["total"]).all()
