"""Data-parallel reconstruction: 2 (or 3) gloo processes on 127.0.0.1 compute the single process's step
for the same global batch (values, gradients, Adam step, trajectory), write only from rank 0,
resume with another world size and refuse ranks whose config differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo_ranks import COLLECTIVE_TIMEOUT_S, run_ranks, worker
from relative_error import rel_rms

from bench.common import free_local_port
from tldr_fast import api, conditioning, distributed, engine, losses, objective, serialization
from tldr_fast.compiled import CompiledStep
from tldr_fast.config import ReconstructionConfig
from tldr_fast.models import PaperCNN

SHAPE = (1, 8, 8)
# batch 5 over 2 ranks: an uneven split (2 + 3 images of each generator's batch).
TINY = {
    "latent_dim": 6,
    "generator_width": 4,
    "batch_size": 5,
    "num_generators": 2,
    "eta_pix": 1.0,
    "eta_bn": 0.5,
    "eps": 0.05,
    "log_every": 1,
}
# Global-batch variants: the authors' batch-mean gradient norm and raw-feature Gram; the chunked
# classifier; the KKT term (its multipliers: each rank's images' share of their gradient).
VARIANTS = {
    "per-sample": {},
    "batch-grad-raw-gram": {"grad_norm_mode": "batch", "ortho_normalized": False},
    "chunked": {"classifier_chunk_size": 2},
    "kkt": {"eta_kkt": 1.0, "kkt_train_size": 20},
    "kkt-chunked": {"eta_kkt": 1.0, "classifier_chunk_size": 2},
}


def make_classifier(dtype=torch.float32) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    model = PaperCNN(1, 10, 8, channels=(4, 8), hidden=16)
    for m in model.modules():  # running statistics unlike those of the generated images
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.to(dtype).eval().requires_grad_(False)


def float64_step(overrides: dict):
    """(grads, report, params after one Adam step) of the objective in float64, in this process's
    process group (a Shard) or alone."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the generators, their parameters and the noise
    try:
        return _float64_step(overrides)
    finally:
        torch.set_default_dtype(previous)


def _float64_step(overrides: dict):
    cfg = ReconstructionConfig(**{**TINY, **overrides})
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE)
    labels = (
        conditioning.balanced_labels(cfg.batch_size, 10).expand(cfg.num_generators, -1).contiguous()
    )
    problem = objective.Problem(
        template,
        make_classifier(torch.float64),
        cfg,
        labels,
        distributed.current_shard(cfg.batch_size),
    )
    torch.manual_seed(11)
    grads, (_, report) = objective.grad_and_report(
        params, buffers, objective.draw_noise(problem), problem
    )
    if problem.shard is not None:
        grads, report = distributed.sum_over_ranks(problem.shard, grads, report)
    torch.manual_seed(11)
    stepped, _, _ = engine.make_step(problem, buffers)(params, engine.AdamState.zeros_like(params))
    return grads, report, stepped


def generator_images_and_grads():
    """(images, d/dtheta) in float64 of the generators' images of one step and of a fixed
    per-image function of them, <w, x>: this rank's images and its share of the gradient in a
    process group, all images and the whole gradient alone. The generators' BatchNorm couples the
    ranks' images, so the shares add up to the whole only with its cross-rank terms."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = ReconstructionConfig(**TINY)
        template, params, buffers = objective.build_generators(cfg, 10, SHAPE)
        labels = conditioning.balanced_labels(cfg.batch_size, 10)
        labels = labels.expand(cfg.num_generators, -1).contiguous()
        shard = distributed.current_shard(cfg.batch_size)
        problem = objective.Problem(template, make_classifier(torch.float64), cfg, labels, shard)
        start, stop = (0, cfg.batch_size) if shard is None else (shard.start, shard.stop)
        gen = torch.Generator().manual_seed(3)
        w = torch.randn(cfg.num_generators, cfg.batch_size, *SHAPE, generator=gen)[:, start:stop]
        torch.manual_seed(11)
        noise = objective.draw_noise(problem)
        vectors = objective.condition(problem, noise)

        def weighted(p):
            x = objective._generate_local(problem, p, buffers, noise, vectors)
            return (w * x).sum(), x

        grads, images = torch.func.grad(weighted, has_aux=True)(params)
        return images, grads
    finally:
        torch.set_default_dtype(previous)


def train_run(run_dir: Path, steps: int, **overrides):
    cfg = ReconstructionConfig(**{**TINY, "steps": steps, "checkpoint_every": 2, **overrides})
    return api.reconstruct(
        make_classifier(), 10, SHAPE, cfg, run_dir=run_dir, progress=False, samples_per_class=1
    )


def _scenario_float64(rank, out):
    return {name: float64_step(overrides) for name, overrides in VARIANTS.items()}


def _scenario_generator(rank, out):
    return dict(zip(("images", "grads"), generator_images_and_grads(), strict=True))


def _scenario_train(rank, out):
    writes = []
    original = serialization.atomic_write

    def recording(path, write):
        writes.append(str(path))
        return original(path, write)

    serialization.atomic_write = recording
    try:
        result = train_run(out / "run", steps=3)
    finally:
        serialization.atomic_write = original
    return {"images": result.images, "writes": writes}


def _scenario_mismatch(rank, out):
    cfg = ReconstructionConfig(**{**TINY, "steps": 1, "seed": rank})
    try:
        engine.train(make_classifier(), 10, SHAPE, cfg, progress=False)
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def _scenario_killed(rank, out):
    """Rank 1 dies in step 3, after the checkpoint of step 2."""
    if rank == 1:
        sum_over_ranks, calls = distributed.sum_over_ranks, []

        def dying(*args):
            calls.append(None)
            if len(calls) == 3:
                os._exit(KILLED_EXIT)
            return sum_over_ranks(*args)

        distributed.sum_over_ranks = dying
    train_run(out / "run", steps=4)
    return {}


def _scenario_compiled(rank, out):
    """One step eager and one traced into a single graph (aot_eager: Dynamo and AOTAutograd, no code
    generation), the per-sample gradient norm off to keep the trace short."""
    cfg = ReconstructionConfig(**{**TINY, "eta_grad": 0.0})
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE)
    labels = (
        conditioning.balanced_labels(cfg.batch_size, 10).expand(cfg.num_generators, -1).contiguous()
    )
    problem = objective.Problem(
        template, make_classifier(), cfg, labels, distributed.current_shard(cfg.batch_size)
    )
    step = engine.make_step(problem, buffers)
    state = engine.AdamState.zeros_like(params)
    torch.manual_seed(0)
    eager, _, _ = step(params, state)
    torch.manual_seed(0)
    compiled, _, _ = CompiledStep(step, backend="aot_eager")(params, state)
    return {"eager": eager, "compiled": compiled}


KILLED_EXIT = 3


# -- tests ----------------------------------------------------------------------------------------


def test_split_is_exact_and_uneven_where_it_must_be():
    assert distributed.split(5, 2) == [(0, 2), (2, 5)]
    assert distributed.split(7, 3) == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(ValueError, match="batch_size 2 is smaller than the world size 3"):
        distributed.split(2, 3)


@pytest.mark.parametrize("normalized", [True, False])
def test_diversity_from_sums_equals_the_losses_on_the_whole_batch(normalized):
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 9, 4, dtype=torch.float64, generator=gen)
    feat[1, 2] = 0.0  # a zero feature row: normalised to zero in both forms
    parts = [
        distributed.diversity_sums(feat[:, s:e], normalized) for s, e in distributed.split(9, 3)
    ]
    sums = tuple(sum(p[i] for p in parts) for i in range(3))
    cos, ortho = distributed.diversity_from_sums(sums, 9)
    for k in range(3):
        assert rel_rms(cos[k], losses.cosine_diversity(feat[k])) < 1e-12
        assert rel_rms(ortho[k], losses.ortho_diversity(feat[k], normalized=normalized)) < 1e-12


def test_three_ranks_generate_the_single_process_images_and_gradient(tmp_path):
    """Batch 5 on 3 ranks (1 + 2 + 2 images): BatchNorm with the global statistics, each rank's
    rows of the single process's dropout masks, and gradients whose sum is the whole gradient."""
    ranks = run_ranks(_scenario_generator, tmp_path, world=3)
    images, grads = generator_images_and_grads()
    assert [got["images"].shape[1] for got in ranks] == [1, 2, 2]
    got_images = torch.cat([got["images"] for got in ranks], dim=1)
    assert not got_images.isnan().any()
    assert rel_rms(got_images, images) < 1e-12
    # Floor: the whole gradient's scale; the biases before a BatchNorm have a structurally-zero one.
    scale = max(g.abs().max() for g in grads.values())
    for param, g in grads.items():
        total = sum(got["grads"][param] for got in ranks)
        assert (total - g).abs().max() <= 1e-10 * scale, param


def test_two_ranks_equal_one_process_in_float64(tmp_path):
    ranks = run_ranks(_scenario_float64, tmp_path)
    for name, overrides in VARIANTS.items():
        grads, report, stepped = float64_step(overrides)
        for got in ranks:
            got_grads, got_report, got_stepped = got[name]
            for term, value in report.items():
                assert rel_rms(got_report[term], value) < 1e-10, (name, term)
            # Floor: the whole gradient's scale; the biases before a BatchNorm have a structurally-zero one.
            scale = max(g.abs().max() for g in grads.values())
            for param, g in grads.items():
                assert (got_grads[param] - g).abs().max() <= 1e-10 * scale, (name, param)
            # Adam's first step, lr g / (|g| + eps), moves by at most lr / eps per unit change of g.
            lr = ReconstructionConfig(**{**TINY, **overrides}).lr
            for param, p in stepped.items():
                assert (got_stepped[param] - p).abs().max() <= 1e-10 * (
                    p.abs().max() + lr * scale / engine.ADAM_EPS
                ), (name, param)
        # Adam state is identical on every rank: the same parameters bit for bit.
        assert all(torch.equal(ranks[0][name][2][p], ranks[1][name][2][p]) for p in stepped)


def test_two_ranks_train_like_one_process_and_only_rank_zero_writes(tmp_path):
    ranks = run_ranks(_scenario_train, tmp_path)
    single = train_run(tmp_path / "single", steps=3)
    for got in ranks:
        assert rel_rms(got["images"], single.images) < 1e-4
    assert ranks[0]["writes"] and not ranks[1]["writes"]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["world_size"] == 2 and record["rank_batch_sizes"] == [2, 3]
    assert [p.name for p in engine.list_checkpoints(tmp_path / "run")] == [
        "step-00000002.safetensors"
    ]

    # Resume the 2-rank run in one process: checkpoints hold global state only.
    resumed = api.reconstruct(
        make_classifier(),
        10,
        SHAPE,
        ReconstructionConfig(**{**TINY, "steps": 4, "checkpoint_every": 2}),
        run_dir=tmp_path / "run",
        resume=True,
        progress=False,
        samples_per_class=1,
    )
    straight = train_run(tmp_path / "straight", steps=4)
    assert rel_rms(resumed.images, straight.images) < 1e-4
    assert len(resumed.history["total"]) == 4


def test_a_rank_with_another_config_is_refused_naming_it(tmp_path):
    for got in run_ranks(_scenario_mismatch, tmp_path):
        assert got["error"] is not None and got["error"].startswith(
            "rank 1 has a different config than rank 0"
        )


def test_a_killed_rank_fails_the_other_and_leaves_a_resumable_checkpoint(tmp_path):
    context = mp.get_context("spawn")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = free_local_port()
    ranks = [
        context.Process(target=worker, args=(r, 2, port, _scenario_killed, str(tmp_path)))
        for r in range(2)
    ]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=COLLECTIVE_TIMEOUT_S + 120)
    codes = [p.exitcode for p in ranks]
    for p in ranks:
        if p.is_alive():
            p.kill()
    assert codes[1] == KILLED_EXIT
    assert codes[0] not in (None, 0), "rank 0 must fail, not hang or succeed, when its peer dies"
    assert [p.name for p in engine.list_checkpoints(tmp_path / "run")] == [
        "step-00000002.safetensors"
    ]
    resumed = api.reconstruct(
        make_classifier(),
        10,
        SHAPE,
        ReconstructionConfig(**{**TINY, "steps": 4, "checkpoint_every": 2}),
        run_dir=tmp_path / "run",
        resume=True,
        progress=False,
        samples_per_class=1,
    )
    assert len(resumed.history["total"]) == 4 and torch.isfinite(resumed.images).all()


def _torchrun(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    model = tmp_path / "model.safetensors"
    if not model.exists():
        serialization.save(model, make_classifier())
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_local_port()),
        "-m",
        "tldr_fast",
        "reconstruct",
        "--model",
        str(model),
        "--steps",
        "2",
        "--generators",
        "2",
        "--set",
        "latent_dim=6",
        "--set",
        "generator_width=4",
        "--no-progress",
        "--samples-per-class",
        "1",
        *flags,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_torchrun_cli_runs_data_parallel_and_refuses_a_batch_smaller_than_the_world(tmp_path):
    done = _torchrun(tmp_path, "--out", str(tmp_path / "run"), "--batch-size", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["world_size"] == 2 and record["rank_batch_sizes"] == [2, 3]
    # One image per generator (no diversity terms, which need two): fewer than the 2 ranks.
    refused = _torchrun(
        tmp_path,
        "--out",
        str(tmp_path / "small"),
        "--batch-size",
        "1",
        "--set",
        "gamma=0",
        "--set",
        "delta=0",
    )
    assert refused.returncode != 0
    assert "batch_size 1 is smaller than the world size 2" in refused.stderr


@pytest.mark.slow
@pytest.mark.compile
def test_the_data_parallel_step_traces_into_one_graph_with_its_collectives(tmp_path):
    for got in run_ranks(_scenario_compiled, tmp_path):
        for name, p in got["eager"].items():
            assert rel_rms(got["compiled"][name], p) < 1e-5, name
