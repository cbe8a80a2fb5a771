"""`python -m bench distributed`: data-parallel scaling of the reconstruction step over gloo ranks.

The step is `bench.step`'s (PaperCNN on 28x28 MNIST-shaped images, all nine terms, one
generator), run by `engine.make_step` in W processes of one thread each on 127.0.0.1, each rank
holding its slice of the global batch (`tldr_fast.distributed`). Rows, for W = 1 and 2:
- strong scaling: the same global batch B on 1 and on 2 ranks;
- weak scaling: B on 1 rank against 2B on 2 ranks (the same images per rank).
Each row: world size, global batch, median seconds of a step on rank 0 (the ranks start each step
together at a barrier), images/s, the speedup over 1 rank at the same global batch (strong) or the
efficiency t(1 rank, B) / t(2 ranks, 2B) (weak), rank 0's process CPU seconds per step and
their ratio to 1 rank's at the same global batch (how much of the work a rank was left with,
which a shared machine's contention does not inflate the way it inflates wall time, except for
the time a rank spends spinning in a collective), and the bytes each rank all-reduces per step
(the whole-batch statistics, the gradients and the loss values, the generators' BatchNorm sums
forward and backward), also per image of the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import free_local_port
from bench.step import IMAGE_SHAPE, NUM_CLASSES, bench_classifier, step_config

CPU_BATCH, CPU_QUICK_BATCH = 64, 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed suite")
    g.add_argument(
        "--dist-batch",
        type=int,
        default=None,
        help="global batch of the strong-scaling rows "
        "(default 64; --quick 16); the weak-scaling row on 2 ranks runs twice this",
    )
    g.add_argument(
        "--dist-steps", type=int, default=None, help="timed steps per row (default 6; --quick 2)"
    )


def _rank(rank: int, world: int, port: int, batch: int, steps: int, out: str) -> None:
    """One rank: time `steps` steps (after one warm-up) and count the bytes it all-reduces."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as functional

    from tldr_fast import conditioning, distributed, objective
    from tldr_fast.engine import AdamState, make_step

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    # Every in-step collective is a functional all-reduce (the statistics, the gradients, and the
    # generators' BatchNorm sums in both directions): counting calls of it counts them all.
    reduced_bytes = []
    original = functional.all_reduce

    def counting(tensor, *args, **kwargs):
        reduced_bytes.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    functional.all_reduce = counting
    try:
        cfg = step_config(batch)
        template, params, buffers = objective.build_generators(cfg, NUM_CLASSES, IMAGE_SHAPE)
        labels = conditioning.balanced_labels(batch, NUM_CLASSES).expand(1, -1).contiguous()
        problem = objective.Problem(
            template, bench_classifier("cpu"), cfg, labels, distributed.current_shard(batch)
        )
        step = make_step(problem, buffers)
        state = AdamState.zeros_like(params)
        torch.manual_seed(0)
        times, cpu_times = [], []
        for i in range(steps + 1):
            if world > 1:
                dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            params, state, _ = step(params, state)
            if i:  # the first step warms up
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        if rank == 0:
            per_step = sum(reduced_bytes) // (steps + 1)
            Path(out).write_text(
                json.dumps(
                    {
                        "median_s": statistics.median(times),
                        "median_cpu_s": statistics.median(cpu_times),
                        "min_s": min(times),
                        "repeats": len(times),
                        "allreduce_bytes": per_step,
                    }
                )
            )
    finally:
        functional.all_reduce = original
        if world > 1:
            dist.destroy_process_group()


def _measure(world: int, batch: int, steps: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_rank, args=(world, free_local_port(), batch, steps, out), nprocs=world)
        return json.loads(Path(out).read_text())


def run(args) -> list[dict]:
    if args.device != "cpu":
        raise ValueError(
            f"the distributed suite runs gloo ranks on the CPU; got --device {args.device}"
        )
    batch = args.dist_batch or (CPU_QUICK_BATCH if args.quick else CPU_BATCH)
    steps = args.dist_steps or (2 if args.quick else 6)
    measured = {
        (w, b): _measure(w, b, steps)
        for w, b in ((1, batch), (2, batch), (1, 2 * batch), (2, 2 * batch))
    }
    rows = []
    for (world, b), m in measured.items():
        row = {
            "name": "distributed-step",
            "world_size": world,
            "threads_per_rank": 1,
            "global_batch": b,
            "rank_batch": b // world,
            "median_s": m["median_s"],
            "median_cpu_s": m["median_cpu_s"],
            "min_s": m["min_s"],
            "repeats": m["repeats"],
            "images_per_s": b / m["median_s"],
            "allreduce_bytes_per_step": m["allreduce_bytes"],
            "allreduce_bytes_per_image": m["allreduce_bytes"] / b,
        }
        if world == 2:
            row["strong_speedup"] = measured[1, b]["median_s"] / m["median_s"]
            row["cpu_ratio"] = measured[1, b]["median_cpu_s"] / m["median_cpu_s"]
            if b == 2 * batch:
                row["weak_efficiency"] = measured[1, batch]["median_s"] / m["median_s"]
        rows.append(row)
    return rows
