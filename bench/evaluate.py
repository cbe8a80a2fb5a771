"""Matching benchmark: reconstructions against a whole training split, per-class SSIM + Hungarian.

The case measured: 1,000 reconstructions against all 60,000 MNIST training images (per-class SSIM
matrices plus Hungarian matching), which should take under 3 minutes on 2 CPU cores. Timings do not depend on
image content, so the "reconstructions" are a balanced set of test-split digits. Each stage runs
once (a full run is minutes on CPU); --quick shrinks to 200 against 6,000.

--sharded times the per-class SSIM matrices alone (`class_ssim_matrices`) on 1 rank against W
gloo ranks on 127.0.0.1 (`--shard-ranks`, default 2), one intra-op thread each, in interleaved
rounds (1 rank, W ranks, 1 rank, ...; each round starts the ranks afresh and times
`--shard-calls` calls after a warm-up call, the ranks starting each call together at a barrier),
so that the load of a shared machine weighs on both alike. Rows: the median and minimum wall
seconds of a call on rank 0 over all rounds; the median process CPU seconds of a call on rank 0
(the work a rank does, whatever the machine's load); for W ranks the ratios t(1) / t(W) of the
medians (wall and CPU) and the median over rounds of the per-round wall ratio; and the bytes each
rank receives in the all-gather of the blocks (W times the largest rank's share, float32),
besides the 32-byte input digests.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import free_local_port


def add_arguments(parser) -> None:
    parser.add_argument(
        "--train-data", default="mnist", help="dataset whose whole training split is matched"
    )
    parser.add_argument(
        "--recon", type=int, default=1000, help="number of reconstructions (balanced)"
    )
    parser.add_argument(
        "--impl", default="auto", choices=("auto", "compiled", "eager"), help="SSIM pointwise path"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 is faster on an oversubscribed machine",
    )
    g = parser.add_argument_group("evaluate --sharded")
    g.add_argument(
        "--sharded",
        action="store_true",
        help="time the SSIM matrices on 1 rank against --shard-ranks gloo ranks (CPU, 1 thread each)",
    )
    g.add_argument(
        "--shard-ranks", type=int, default=2, help="ranks of the sharded rows (compared with 1)"
    )
    g.add_argument(
        "--shard-rounds", type=int, default=5, help="interleaved rounds of the sharded rows"
    )
    g.add_argument("--shard-calls", type=int, default=2, help="timed calls per rank launch")


def run(args) -> list[dict]:
    from tldr_fast import datasets
    from tldr_fast.evaluate import (
        authors_statistics,
        class_ssim_matrices,
        nearest_neighbour_statistics,
    )
    from tldr_fast.ssim import ssim_matrix

    train_data = getattr(args, "train_data", "mnist")
    n_recon = 200 if args.quick else getattr(args, "recon", 1000)
    train = datasets.load_dataset(train_data, "train")
    if args.quick:
        train = datasets.balanced_subset(
            train, 6000 if train.num_classes == 10 else 60 * train.num_classes
        )
    recon = datasets.load_dataset(train_data, "test", subset=n_recon, seed=1)
    impl = getattr(args, "impl", "auto")
    if getattr(args, "sharded", False):
        return _sharded_rows(args, recon, train, impl)
    device = torch.device(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    if impl != "eager":  # compile once outside the timing, as a long-running evaluation would
        warm = recon.images[:2]
        ssim_matrix(warm, warm, impl="compiled", device=device)

    cpu_seconds = []

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu_seconds.append(time.process_time() - c0)
        return out, time.perf_counter() - t0

    cm, t_matrices = timed(
        lambda: class_ssim_matrices(
            recon.images,
            recon.labels,
            train.images,
            train.labels,
            train.num_classes,
            device=device,
            impl=impl,
        )
    )
    authors, t_hungarian = timed(lambda: authors_statistics(cm))
    _, t_nn = timed(lambda: nearest_neighbour_statistics(cm))
    pairs = sum(s.size for s in cm.ssim.values())
    total = t_matrices + t_hungarian
    return [
        {
            "name": "authors_protocol",
            "train_data": train_data,
            "recon": len(recon.labels),
            "train": len(train.labels),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "impl": impl,
            "pairs": pairs,
            "matrices_s": t_matrices,
            "hungarian_s": t_hungarian,
            "nearest_neighbour_s": t_nn,
            "total_s": total,
            "process_cpu_s": sum(
                cpu_seconds
            ),  # wall time is inflated when other jobs share the cores
            "load_average_1min": os.getloadavg()[0],
            "pairs_per_s": pairs / t_matrices,
            "percent_reconstructed": authors["percent_reconstructed"],
            "target_s": 180.0,
            "meets_target": total < 180.0,
        }
    ]


# -- the SSIM matrices on 1 rank against W ranks ------------------------------------------------


def _sharded_rows(args, recon, train, impl: str) -> list[dict]:
    from tldr_fast.ssim import matrix_blocks, split_blocks

    if args.device != "cpu":
        raise ValueError(f"--sharded runs gloo ranks on the CPU; got --device {args.device}")
    world = args.shard_ranks
    if world < 2:
        raise ValueError(f"--shard-ranks must be at least 2 (compared with 1 rank), got {world}")
    classes = torch.unique(recon.labels).tolist()  # as class_ssim_matrices pairs them
    pairs = [(recon.images[recon.labels == c], train.images[train.labels == c]) for c in classes]
    blocks = matrix_blocks(pairs, impl=impl)
    shares = [
        sum(b.size for b in blocks[a:z]) for a, z in split_blocks([b.size for b in blocks], world)
    ]
    times: dict[int, list[float]] = {1: [], world: []}
    cpu: dict[int, list[float]] = {1: [], world: []}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.pt"
        torch.save(
            {
                "recon": recon.images,
                "recon_labels": recon.labels,
                "train": train.images,
                "train_labels": train.labels,
            },
            case,
        )
        for _ in range(args.shard_rounds):
            medians = {}
            for w in (1, world):
                measured = _launch(w, case, impl, args.shard_calls)
                times[w] += measured["wall_s"]
                cpu[w] += measured["cpu_s"]
                medians[w] = statistics.median(measured["wall_s"])
            ratios.append(medians[1] / medians[world])
    rows = []
    for w, seconds in times.items():
        row = {
            "name": "sharded-ssim-matrices",
            "train_data": getattr(args, "train_data", "mnist"),
            "recon": len(recon.labels),
            "train": len(train.labels),
            "impl": impl,
            "blocks": len(blocks),
            "pairs": sum(b.size for b in blocks),
            "ranks": w,
            "threads_per_rank": 1,
            "rank_pairs": sum(b.size for b in blocks) if w == 1 else max(shares),
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "median_cpu_s": statistics.median(cpu[w]),
            "calls": len(seconds),
            "rounds": args.shard_rounds,
            "all_gather_bytes": 0 if w == 1 else w * max(shares) * 4,
            "load_average_1min": os.getloadavg()[0],
        }
        if w > 1:
            row["speedup_of_medians"] = statistics.median(times[1]) / row["median_s"]
            row["cpu_ratio_of_medians"] = statistics.median(cpu[1]) / row["median_cpu_s"]
            row["median_round_ratio"] = statistics.median(ratios)
            row["round_ratios"] = ratios
        rows.append(row)
    return rows


def _launch(world: int, case: Path, impl: str, repeats: int) -> dict[str, list[float]]:
    """Wall and process CPU seconds of each timed call on rank 0 of `world` freshly started ranks."""
    import torch.multiprocessing as mp

    out = case.parent / "rank0.json"
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(
        _rank, args=(world, free_local_port(), str(case), impl, repeats, str(out)), nprocs=world
    )
    return json.loads(out.read_text())


def _rank(rank: int, world: int, port: int, case: str, impl: str, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from tldr_fast.evaluate import class_ssim_matrices

    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        group = dist.group.WORLD
    try:
        data = torch.load(case, weights_only=True)
        seconds: dict[str, list[float]] = {"wall_s": [], "cpu_s": []}
        for i in range(repeats + 1):  # the first call warms up (and compiles for impl compiled)
            if group is not None:
                dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            class_ssim_matrices(
                data["recon"],
                data["recon_labels"],
                data["train"],
                data["train_labels"],
                impl=impl,
                group=group,
            )
            if i:
                seconds["wall_s"].append(time.perf_counter() - start)
                seconds["cpu_s"].append(time.process_time() - cpu_start)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        if group is not None:
            dist.destroy_process_group()
