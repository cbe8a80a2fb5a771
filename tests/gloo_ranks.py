"""Tests on a gloo process group of W processes on 127.0.0.1: each rank runs one scenario and
saves what it returns, a tree of tensors and plain values read back with weights_only=True."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import free_local_port

# Seconds a collective waits for a peer: a dead rank fails the others well within a test's time.
COLLECTIVE_TIMEOUT_S = 60


def worker(rank: int, world: int, port: int, scenario, out: str) -> None:
    """One rank: join the group, save scenario(rank, out) as OUT/rankR.pt. scenario is a
    module-level function (the spawned process imports it by name)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        torch.save(scenario(rank, Path(out)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(scenario, out: Path, world: int = 2) -> list[dict]:
    """What each of `world` spawned ranks returned from scenario(rank, out), in rank order."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(world, free_local_port(), scenario, str(out)), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
