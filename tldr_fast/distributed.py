"""Data-parallel reconstruction on torch.distributed: every rank computes a slice of each
generator's global batch, and the ranks together compute exactly the single-process step.

Split: with W ranks and the global per-generator batch B, rank r owns images [r B // W,
(r + 1) B // W) of every generator's batch (sizes differ by at most one). Every rank draws the
whole step's noise from the same seeded RNG, so every rank's RNG state is the single process's,
and computes only its own images: the generators run on the rank's slice, with their BatchNorm
normalising by the global batch's statistics and their dropout applying the rank's rows of the
single process's masks (`sharded_generator`), and so does the classifier side (its passes, the
per-sample gradient norms and their double backward).

Terms. A per-image term enters rank r as (1/B) sum over its images. A whole-batch term T is a
function of additive statistics sigma = sum_r sigma_r (BatchNorm channel sums, the batch-mean
gradient, and for the diversity losses the sums of `diversity_sums`): rank r evaluates
T(sigma_r + stop_grad(sum_r' sigma_r' - sigma_r)), whose value is the global T and whose gradient
is the rank's own share dT/dsigma . dsigma_r/dtheta. The sum over ranks of the ranks' gradients is
therefore the single-process gradient, which one bucketed all-reduce per step forms
(`sum_over_ranks`); every rank then applies the same Adam update and keeps identical state.
Collectives per step: the classifier-side statistics in the forward pass, the gradients (with the
loss values) after the backward pass, and inside the generators two small all-reduces per
BatchNorm layer in each direction (the only differentiable collective: see `sharded_generator`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional
from torch.utils._pytree import tree_flatten, tree_unflatten

from tldr_fast import losses

# Seconds a rank waits in a collective for the others; past it a dead peer fails the run.
TIMEOUT_ENV = "TLDR_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel run: images [start, stop) of each generator's batch."""

    rank: int
    world_size: int
    start: int
    stop: int
    batch_sizes: tuple[int, ...]  # images per generator on each rank

    @property
    def group(self):
        return dist.group.WORLD


def split(batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank: rank r gets images r B // W to (r + 1) B // W."""
    if world_size > batch_size:
        raise ValueError(
            f"batch_size {batch_size} is smaller than the world size {world_size}: every rank "
            f"needs at least one image of each generator's batch"
        )
    return [
        (r * batch_size // world_size, (r + 1) * batch_size // world_size)
        for r in range(world_size)
    ]


def default_group() -> dist.ProcessGroup | None:
    """The initialised default process group when it has more than one process, else None (the
    single-process path)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def current_shard(batch_size: int) -> Shard | None:
    """The Shard of this process in the initialised default process group, or None outside one
    (or in a group of one process): the single-process path."""
    if default_group() is None:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    ranges = split(batch_size, world)
    start, stop = ranges[rank]
    return Shard(rank, world, start, stop, tuple(e - s for s, e in ranges))


def init_from_env() -> torch.device | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL with
    this process's GPU (LOCAL_RANK) when CUDA is available, gloo on CPU. Returns the device the
    rank computes on, or None when not launched by torchrun (or a group is already initialised)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        return device
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def is_writer(shard: Shard | None) -> bool:
    """Whether this process writes the run's files: rank 0, or the only process."""
    return shard is None or shard.rank == 0


def rank_zero(shard: Shard | None, write, *args) -> None:
    """write(*args) on rank 0 (or the only process) while the others wait at a barrier."""
    if is_writer(shard):
        write(*args)
    if shard is not None:
        dist.barrier()


def run_record(shard: Shard | None) -> dict:
    """What config.json records of the data-parallel layout ({} for a single process)."""
    if shard is None:
        return {}
    return {"world_size": shard.world_size, "rank_batch_sizes": list(shard.batch_sizes)}


# -- the diversity losses from sums -------------------------------------------------------------


def diversity_sums(feat: torch.Tensor, normalized: bool = True):
    """Additive statistics of the diversity losses of features feat (K, n, D): (s, q, M) with
    f^ the L2-normalised rows, s = sum_i f^_i (K, D), q = sum_i ||f^_i||^2 (K,) and
    M = F^T F (K, D, D), F = F^ (or the raw rows for normalized=False). Sums over disjoint parts
    of a batch add up to the whole batch's."""
    fn = losses._normalize(feat)
    rows = fn if normalized else losses._acc(feat)
    return fn.sum(-2), fn.square().sum((-2, -1)), rows.mT @ rows


def diversity_from_sums(sums, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, ortho), each (K,), of a batch of n images from its `diversity_sums` (s, q, M):
    cos = (||s||^2 - q) / (n (n - 1)) and ortho = (||M||_F^2 - 2 tr M + n) / n^2, which are
    `losses.cosine_diversity` and `losses.ortho_diversity` (||F F^T - I||_F^2 = ||F^T F||_F^2
    - 2 ||F||_F^2 + n)."""
    s, q, m = sums
    cos = (s.square().sum(-1) - q) / (n * (n - 1))
    ortho = (m.square().sum((-2, -1)) - 2 * m.diagonal(dim1=-2, dim2=-1).sum(-1) + n) / (n * n)
    return cos, ortho


# -- collectives --------------------------------------------------------------------------------


def _all_reduce_sum(leaves: list[torch.Tensor], shard: Shard) -> list[torch.Tensor]:
    """Sums over ranks of the leaves: one collective per dtype on a flat buffer."""
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for dtype in dict.fromkeys(t.dtype for t in leaves):
        index = [i for i, t in enumerate(leaves) if t.dtype == dtype]
        flat = torch.cat([leaves[i].reshape(-1) for i in index])
        total = functional.wait_tensor(functional.all_reduce(flat, "sum", shard.group))
        for i, part in zip(index, total.split([leaves[i].numel() for i in index]), strict=True):
            out[i] = part.view_as(leaves[i])
    return out


def sum_statistics(shard: Shard | None, stats):
    """The whole-batch statistics from this rank's (a tree of additive tensors): values summed
    over ranks, gradient that of this rank's own statistics (see the module docstring)."""
    if shard is None:
        return stats
    leaves, spec = tree_flatten(stats)
    totals = _all_reduce_sum([t.detach() for t in leaves], shard)
    return tree_unflatten(
        [t + (total - t.detach()) for t, total in zip(leaves, totals, strict=True)], spec
    )


def report_shares(shard: Shard | None, values: dict, batch_values: dict) -> dict:
    """The rank's share of each reported value, so that their sum over ranks is the global value:
    per-image terms are shares already; whole-batch terms (the same on every rank) count 1/W."""
    if shard is None:
        return values
    return {
        term: value / shard.world_size if term in batch_values else value
        for term, value in values.items()
    }


def sum_over_ranks(shard: Shard, grads: dict[str, torch.Tensor], report: dict[str, torch.Tensor]):
    """(grads, report) summed over ranks in one bucketed all-reduce: the global batch's gradient
    and loss values from the ranks' shares."""
    names = list(grads)
    leaves = _all_reduce_sum([grads[n] for n in names] + list(report.values()), shard)
    return dict(zip(names, leaves[: len(names)], strict=True)), dict(
        zip(report, leaves[len(names) :], strict=True)
    )


# -- refusing mismatched ranks ------------------------------------------------------------------


def ranks_with_other_digests(digests: list[bytes], group, device: torch.device) -> list[list[int]]:
    """Per digest: the ranks of group whose digest differs from rank 0's. The digests (equal
    lengths on every rank) are all-gathered as one uint8 tensor on device (the rank's GPU for
    NCCL): nothing is pickled."""
    mine = torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    differing, start = [], 0
    for digest in digests:
        part = slice(start, start + len(digest))
        differing.append(
            [r for r, g in enumerate(gathered) if not torch.equal(g[part], gathered[0][part])]
        )
        start = part.stop
    return differing


def check_identical(
    shard: Shard | None, config: dict, classifier_sha256: str, device: torch.device
) -> None:
    """Refuse to start when a rank's config or classifier weights differ from rank 0's: the
    sha256 of each is compared across ranks (`ranks_with_other_digests`)."""
    if shard is None:
        return
    digests = [
        hashlib.sha256(json.dumps(config, sort_keys=True).encode()).digest(),
        bytes.fromhex(classifier_sha256),
    ]
    differing = ranks_with_other_digests(digests, shard.group, device)
    for what, ranks in zip(("config", "classifier weights"), differing, strict=True):
        if ranks:
            raise ValueError(
                f"rank {', '.join(map(str, ranks))} has a different {what} than rank 0 (sha256 "
                f"differs): every rank of a data-parallel run must be given the same"
            )
