"""The evaluation sharded over ranks: 2 gloo processes on 127.0.0.1 compute the single process's
SSIM matrices bit for bit (uneven splits, an idle rank), the same metrics from the same trained
evaluator, refuse ranks with other inputs, and only rank 0 writes files (API and torchrun CLI)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks

from bench.common import free_local_port
from tldr_fast import atomic_files, evaluate, serialization
from tldr_fast.evaluate import class_ssim_matrices, evaluate_run, fidelity
from tldr_fast.ssim import matrix_blocks, split_blocks, ssim_matrices

SHAPE = (1, 12, 12)
# The tiny SSIM case: 3 classes, 3 reconstructions and 5 reference images of each. With 2 pairs
# per block the 3 x 5 class matrices fall into 2 x 1 and 1 x 1 blocks (10 per class, 30 in all);
# by default each class matrix is one block, 3 blocks on 2 ranks.
CLASSES, RECON_PER_CLASS, REF_PER_CLASS, SMALL_CHUNK = 3, 3, 5, 2
RUN_OPTIONS = {"num_bootstrap": 100, "device": "cpu"}
EVALUATOR_IMAGES = 600  # of the 3,800 bundled digits outside the target's subset: a short training


@pytest.fixture(autouse=True)
def _one_thread():
    """The ranks run one intra-op thread each; the single-process reference runs with as many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    recon = torch.rand(CLASSES * RECON_PER_CLASS, *SHAPE, generator=gen)
    ref = torch.rand(CLASSES * REF_PER_CLASS, *SHAPE, generator=gen)
    recon_labels = torch.arange(len(recon)) % CLASSES
    ref_labels = torch.arange(len(ref)).flip(0) % CLASSES  # another order than the recon's
    return recon, recon_labels, ref, ref_labels


def write_run(run_dir: Path, model_path: Path) -> None:
    """A run directory whose "reconstructions" are 2 of each class's training digits of the target
    (a balanced subset of 200 bundled MNIST digits)."""
    from tldr_fast import datasets

    train = datasets.load_dataset("mnist-bundled", "train", subset=200, seed=0)
    serialization.write_safetensors_atomic(
        run_dir / "images.safetensors",
        {
            "images": train.images[::10],
            "labels": train.labels[::10],
            "generator_index": torch.arange(20) % 2,
        },
        {"format": "test-run"},
    )
    config = {"kind": "reconstruct", "config": {}, "model": str(model_path), "num_classes": 10}
    (run_dir / "config.json").write_text(json.dumps(config))


def make_run(tmp_path: Path, name: str) -> Path:
    from tldr_fast.models import PaperCNN

    model_path = tmp_path / "target.safetensors"
    if not model_path.exists():
        torch.manual_seed(0)
        serialization.save(
            model_path,
            PaperCNN(1, 10, 28, channels=(4, 8), hidden=16),
            metadata={"dataset": "mnist-bundled", "subset": 200, "seed": 0},
        )
    run_dir = tmp_path / name
    run_dir.mkdir()
    write_run(run_dir, model_path)
    return run_dir


def comparable(metrics: dict) -> dict:
    """metrics without what differs between any two evaluations: the wall time and the directory."""
    return {
        **{k: v for k, v in metrics.items() if k != "seconds"},
        "run": {k: v for k, v in metrics["run"].items() if k != "run_dir"},
    }


def _scenario_matrices(rank, out):
    group = dist.group.WORLD
    recon, recon_labels, ref, ref_labels = tiny_case()
    got = {
        name: {
            c: torch.from_numpy(s)
            for c, s in class_ssim_matrices(
                recon, recon_labels, ref, ref_labels, chunk_size=chunk, group=group
            ).ssim.items()
        }
        for name, chunk in (("small_blocks", SMALL_CHUNK), ("class_blocks", None))
    }
    # One block in all: rank 1 holds none and contributes an empty block.
    got["one_block"] = ssim_matrices([(recon[:2], ref[:3])], group=group)[0]
    got["diversity"] = fidelity(recon, recon_labels, chunk_size=SMALL_CHUNK, group=group)[
        "per_class_diversity"
    ]
    other = ref.clone()
    other[0, 0, 0, 0] = 1 - other[0, 0, 0, 0] if rank == 1 else other[0, 0, 0, 0]
    try:
        ssim_matrices([(recon, other)], group=group)
        got["mismatch"] = None
    except ValueError as err:
        got["mismatch"] = str(err)
    return got


def _scenario_compiled(rank, out):
    recon, recon_labels, ref, ref_labels = tiny_case()
    cm = class_ssim_matrices(
        recon,
        recon_labels,
        ref,
        ref_labels,
        chunk_size=SMALL_CHUNK,
        impl="compiled",
        group=dist.group.WORLD,
    )
    return {c: torch.from_numpy(s) for c, s in cm.ssim.items()}


def _scenario_evaluate_run(rank, out):
    """evaluate_run in the default group, training its evaluator, recording the files it writes."""
    writes = []
    original = atomic_files.atomic_write

    def recording(path, write):
        writes.append(str(path))
        return original(path, write)

    atomic_files.atomic_write = serialization.atomic_write = recording
    evaluate.EVALUATOR_MAX_IMAGES = EVALUATOR_IMAGES  # this rank's process only
    try:
        metrics = evaluate_run(out / "ranks", **RUN_OPTIONS)
    finally:
        atomic_files.atomic_write = serialization.atomic_write = original
    return {"metrics": json.dumps(metrics), "writes": writes}


def _scenario_eager(rank, out):
    """Both eager scenarios in one launch of the ranks (starting a rank costs seconds of imports)."""
    return {"matrices": _scenario_matrices(rank, out), "run": _scenario_evaluate_run(rank, out)}


@pytest.fixture(scope="module")
def eager_ranks(tmp_path_factory):
    """(what each of the 2 ranks returned, the folder holding their run directory "ranks")."""
    out = tmp_path_factory.mktemp("ranks")
    make_run(out, "ranks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_ranks(_scenario_eager, out), out
    finally:
        torch.set_num_threads(threads)


# -- tests ----------------------------------------------------------------------------------------


def test_split_blocks_gives_every_block_one_rank_and_balances_the_pairs():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 20) for _ in range(rng.randint(1, 12))]
        world = rng.randint(1, len(sizes) + 3)
        ranges = split_blocks(sizes, world)
        assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
        share = sum(sizes) / world
        for start, stop in ranges:
            assert start <= stop and sum(sizes[start:stop]) < share + max(sizes)
    assert split_blocks([6, 6, 6, 6], 2) == [(0, 2), (2, 4)]
    assert split_blocks([5], 3) == [(0, 1), (1, 1), (1, 1)]  # more ranks than blocks: idle ranks
    with pytest.raises(ValueError, match="world_size"):
        split_blocks([5], 0)


def test_matrix_blocks_are_the_single_process_blocks():
    recon, recon_labels, ref, ref_labels = tiny_case()
    pairs = [(recon[recon_labels == c], ref[ref_labels == c]) for c in range(CLASSES)]
    blocks = matrix_blocks(pairs, SMALL_CHUNK)
    assert len(blocks) == CLASSES * 2 * REF_PER_CLASS
    assert {b.shape for b in blocks} == {(2, 1), (1, 1)} and {b.impl for b in blocks} == {"eager"}
    covered = [torch.zeros(RECON_PER_CLASS, REF_PER_CLASS, dtype=torch.int64) for _ in pairs]
    for b in blocks:
        covered[b.pair][b.rows, b.cols] += 1
    assert all(bool((c == 1).all()) for c in covered)  # every pair of every matrix exactly once
    assert len(matrix_blocks(pairs)) == CLASSES


def test_two_ranks_compute_the_single_process_matrices_bit_for_bit(eager_ranks):
    ranks = [got["matrices"] for got in eager_ranks[0]]
    recon, recon_labels, ref, ref_labels = tiny_case()
    for name, chunk in (("small_blocks", SMALL_CHUNK), ("class_blocks", None)):
        single = class_ssim_matrices(recon, recon_labels, ref, ref_labels, chunk_size=chunk).ssim
        for got in ranks:
            assert sorted(got[name]) == sorted(single)
            for c, s in single.items():
                assert torch.equal(got[name][c], torch.from_numpy(s)), (name, c)
    one_block = ssim_matrices([(recon[:2], ref[:3])])[0]
    diversity = fidelity(recon, recon_labels, chunk_size=SMALL_CHUNK)["per_class_diversity"]
    for got in ranks:
        assert torch.equal(got["one_block"], one_block)
        assert got["diversity"] == diversity
        assert got["mismatch"] is not None and got["mismatch"].startswith(
            "rank 1 passed other SSIM pairs than rank 0"
        )


@pytest.mark.slow
@pytest.mark.compile
def test_two_ranks_compute_the_compiled_matrices_bit_for_bit(tmp_path):
    ranks = run_ranks(_scenario_compiled, tmp_path)
    recon, recon_labels, ref, ref_labels = tiny_case()
    single = class_ssim_matrices(
        recon, recon_labels, ref, ref_labels, chunk_size=SMALL_CHUNK, impl="compiled"
    ).ssim
    for got in ranks:
        for c, s in single.items():
            assert torch.equal(got[c], torch.from_numpy(s)), c


def test_evaluate_run_on_two_ranks_equals_one_process_and_only_rank_zero_writes(
    eager_ranks, monkeypatch
):
    ranks, out = [got["run"] for got in eager_ranks[0]], eager_ranks[1]
    monkeypatch.setattr(evaluate, "EVALUATOR_MAX_IMAGES", EVALUATOR_IMAGES)
    # As JSON (class keys become strings), which keeps every float exactly.
    single = json.loads(json.dumps(evaluate_run(make_run(out, "single"), **RUN_OPTIONS)))
    assert single["evaluator"]["num_images"] == EVALUATOR_IMAGES  # trained on every rank
    for got in ranks:
        assert comparable(json.loads(got["metrics"])) == comparable(single)
    written = json.loads((out / "ranks" / "metrics.json").read_text())
    assert comparable(written) == comparable(single)
    assert {Path(p).name for p in ranks[0]["writes"]} >= {"metrics.json", "report.html"}
    assert ranks[1]["writes"] == []


def test_torchrun_cli_evaluates_on_two_ranks_like_one_process(tmp_path):
    run_dir = make_run(tmp_path, "ranks")
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
        "evaluate",
        str(run_dir),
        "--evaluator",
        "none",
        "--bootstrap",
        str(RUN_OPTIONS["num_bootstrap"]),
        "--device",
        "cpu",
        "--no-progress",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    single = evaluate_run(make_run(tmp_path, "single"), evaluator=False, **RUN_OPTIONS)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert comparable(written) == comparable(json.loads(json.dumps(single)))
