"""The floor model: the least time the hardware needs for the work a benchmark row does.

    floor(row) = max(FLOPs / matmul peak, bytes / copy bandwidth)

FLOPs are those of the matrix products and convolutions the work runs (forward and backward), as
`torch.utils.flop_counter.FlopCounterMode` counts them (its formulas, `WorkCounter`) (2 per multiply-add); elementwise work is
left to the bytes. Bytes are the sizes of every distinct tensor storage an operator reads or
writes while the work runs, each counted once: inputs, outputs and intermediate activations must
each be read or written at least once; views share their base's storage and count with it.
Both are counted from the actual modules and shapes, by running the work once on the device it is
measured on (the engine picks routes by device), at two small batches b1 < b2; every piece of the
step costs fixed + per_image * batch (the Adam update and the diversity identities' D x D
products are the fixed part), so the two counts give both coefficients exactly and the floor of a
batch of 65536 images needs no run at that size.

The peaks are measured, not taken from a data sheet: a square GEMM of fp32 inputs with TF32
tensor cores allowed, one of bfloat16 inputs, and a device-to-device copy (read + write bytes per
second, `bench.kernels.measure_copy_bandwidth`). The floor at the BF16 peak keeps the fp32 bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import vjp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from bench.common import time_fn
from bench.kernels import measure_copy_bandwidth
from bench.precision import matmul_precision
from bench.step import IMAGE_SHAPE, NUM_CLASSES, make_runner, step_config
from tldr_fast import conditioning, losses, objective
from tldr_fast.engine import AdamState, adam_update
from tldr_fast.grad_norm import per_sample_grad_norm

COUNT_BATCHES = (512, 1024)


class WorkCounter(TorchDispatchMode):
    """FLOPs (FlopCounterMode's per-operator formulas, `flop_registry`) and the summed sizes of the
    distinct storages that operators read or write inside the mode.

    FlopCounterMode itself also tracks modules with backward hooks on their inputs, which autograd
    refuses on a leaf input inside torch.autograd.grad (the gradient-norm suite's call); the formulas
    are the same. The storages seen are kept alive until the mode is left, so a freed buffer whose
    memory is reused by a later tensor is not mistaken for the same storage."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self._seen: dict[int, torch.UntypedStorage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self._seen.setdefault(storage._cdata, storage)
        return out

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self._seen.values())


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int


def count(fn: Callable[[], object]) -> Cost:
    """FLOPs and bytes of one fn() call (see the module docstring)."""
    with WorkCounter() as counter:
        fn()
    return Cost(int(counter.flops), counter.bytes)


@dataclass(frozen=True)
class CostModel:
    """cost(batch) = fixed + per_image * batch, for FLOPs and bytes."""

    fixed: Cost
    per_image: Cost

    @classmethod
    def fit(cls, make: Callable[[int], Callable[[], object]], batches=COUNT_BATCHES) -> CostModel:
        """From the counts of make(b)() at two batches b1 < b2 (make builds the work for a batch)."""
        (b1, c1), (b2, c2) = ((b, count(make(b))) for b in batches)
        per = Cost((c2.flops - c1.flops) // (b2 - b1), (c2.bytes - c1.bytes) // (b2 - b1))
        return cls(Cost(c1.flops - per.flops * b1, c1.bytes - per.bytes * b1), per)

    def at(self, batch: int) -> Cost:
        return Cost(
            self.fixed.flops + self.per_image.flops * batch,
            self.fixed.bytes + self.per_image.bytes * batch,
        )


@dataclass(frozen=True)
class Peaks:
    """Measured rates of the device: FLOP/s of fp32-input (TF32 allowed) and bf16 GEMMs, copy bytes/s."""

    tf32_flop_s: float
    bf16_flop_s: float
    copy_bytes_s: float

    def floor_seconds(self, cost: Cost, precision: str = "tf32") -> float:
        rate = self.tf32_flop_s if precision == "tf32" else self.bf16_flop_s
        return max(cost.flops / rate, cost.bytes / self.copy_bytes_s)

    def as_row(self) -> dict:
        return {
            "tf32_tflop_s": self.tf32_flop_s / 1e12,
            "bf16_tflop_s": self.bf16_flop_s / 1e12,
            "copy_gb_s": self.copy_bytes_s / 1e9,
        }


def gemm_rate(device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a size x size x size product of `dtype` inputs (fp32 with TF32 tensor cores allowed)."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    with matmul_precision("tf32", torch.device(device).type):
        seconds = time_fn(lambda: a @ b, device=device, warmup=3, repeats=10).min_s
    return 2 * size**3 / seconds


def measure_peaks(device, tiny: bool = False) -> Peaks:
    """The GEMM probes (8192^3 on CUDA, 256^3 with `tiny` or on a CPU) and the copy probe."""
    size = 8192 if torch.device(device).type == "cuda" and not tiny else 256
    return Peaks(
        gemm_rate(device, torch.float32, size),
        gemm_rate(device, torch.bfloat16, size),
        measure_copy_bandwidth(str(torch.device(device).type)),
    )


# -- the work of each piece, built for a batch -------------------------------------------------


@dataclass(frozen=True)
class StepPieces:
    """Inputs of the step's pieces at one batch, with the step's own shapes and config."""

    problem: objective.Problem
    params: dict
    buffers: dict
    images: torch.Tensor  # (B, C, H, W) the generator's output, detached
    features: torch.Tensor  # (B, D) the classifier's penultimate features, detached
    logits: torch.Tensor  # (B, N) detached

    @classmethod
    def build(cls, batch: int, classifier, device) -> StepPieces:
        cfg = step_config(batch)
        template, params, buffers = objective.build_generators(
            cfg, NUM_CLASSES, IMAGE_SHAPE, device
        )
        labels = conditioning.balanced_labels(batch, NUM_CLASSES, device)[None]
        problem = objective.Problem(template, classifier, cfg, labels)
        with torch.no_grad():
            images = _generate(problem, params, buffers)[0]
            logits, features = classifier.forward_with_features(images)
        return cls(problem, params, buffers, images, features, logits)

    @property
    def labels(self) -> torch.Tensor:
        return self.problem.labels[0]


def _generate(problem, params, buffers):
    noise = objective.draw_noise(problem)
    return objective.generate(
        problem.template,
        params,
        buffers,
        noise["z"],
        problem.labels,
        objective.condition(problem, noise),
    )


def _backward_to(inputs, fn):
    """fn(inputs) and the vector-Jacobian product of its (summed) outputs back to inputs."""
    out, pull_back = vjp(fn, inputs)
    return pull_back(
        torch.ones_like(out)
        if isinstance(out, torch.Tensor)
        else tuple(torch.ones_like(o) for o in out)
    )


# The step's pieces; the perturbed images take one more `classifier` pass, and the ghost norms'
# forward is the clean `classifier_with_features` pass, shared in the step. `ghost_norms` is also
# the work of the gradient-norm suite's rows (the same call on images of the same shape), and
# `classifier` that of its baseline (less the cross-entropy's few bytes per image).
PIECES = (
    "generator",
    "classifier_with_features",
    "classifier",
    "ghost_norms",
    "kl_ce",
    "diversity",
    "tv_pixel",
    "adam",
)


def piece_work(piece: str, pieces: StepPieces) -> Callable[[], object]:
    """A zero-argument callable running one piece of the step, forward and backward."""
    if piece not in PIECES:
        raise ValueError(f"piece must be one of {PIECES}, got {piece!r}")
    p = pieces
    classifier = p.problem.classifier
    if piece == "generator":
        return lambda: _backward_to(
            p.params, lambda params: _generate(p.problem, params, p.buffers)
        )
    if piece == "classifier_with_features":
        return lambda: _backward_to(p.images, classifier.forward_with_features)
    if piece == "classifier":
        return lambda: _backward_to(p.images, classifier)
    if piece == "ghost_norms":
        x = p.images.detach().requires_grad_()
        return lambda: torch.autograd.grad(
            per_sample_grad_norm(classifier, x, p.labels, backend="ghost").mean(), x
        )
    if piece == "kl_ce":
        vectors = F.one_hot(p.labels, NUM_CLASSES).float()
        return lambda: _backward_to(
            p.logits, lambda z: losses.kl(z, vectors) + losses.ce(z, p.labels)
        )
    if piece == "diversity":
        return lambda: _backward_to(p.features, lambda f: sum(losses.diversity_losses(f)))
    if piece == "tv_pixel":
        return lambda: _backward_to(p.images, lambda x: sum(losses.tv_pixel(x)))
    state = AdamState.zeros_like(p.params)  # "adam"
    cfg = p.problem.config
    return lambda: adam_update(p.params, p.params, state, cfg.lr, cfg.adam_beta1, cfg.adam_beta2)


def step_work(batch: int, classifier, device) -> Callable[[], object]:
    """One step of the engine's eager step (`bench.step` variant fast-eager, whole batch at once)."""
    return make_runner("fast-eager", batch, classifier, device)


def ssim_pair_cost(device, size: int = 8) -> Cost:
    """Cost per image pair of `ssim_matrix` (eager pointwise part) on MNIST-size images: the count
    of size x 4 size pairs less that of size/2 x 4 size, over the pairs added."""
    from tldr_fast.ssim import ssim_matrix

    gen = torch.Generator().manual_seed(0)
    b = torch.rand(4 * size, *IMAGE_SHAPE, generator=gen).to(device)
    small, large = (
        count(lambda m=m: ssim_matrix(b[:m], b, impl="eager")) for m in (size // 2, size)
    )
    pairs = (size - size // 2) * b.shape[0]
    return Cost((large.flops - small.flops) // pairs, (large.bytes - small.bytes) // pairs)


@dataclass(frozen=True)
class Floors:
    """The cost models every suite's rows are set against, counted on one device."""

    step: CostModel
    pieces: dict[str, CostModel]
    ssim_pair: Cost

    @classmethod
    def count_on(cls, classifier, device, batches=COUNT_BATCHES) -> Floors:
        """Counted at `batches`: above the features' dimension (256) for rows at larger batches, where
        the diversity identities take their D x D route (below it the N x N route is cheaper)."""
        pieces = {
            piece: CostModel.fit(
                lambda b, piece=piece: piece_work(piece, StepPieces.build(b, classifier, device)),
                batches,
            )
            for piece in PIECES
        }
        return cls(
            step=CostModel.fit(lambda b: step_work(b, classifier, device), batches),
            pieces=pieces,
            ssim_pair=ssim_pair_cost(device),
        )

    def rows(self, peaks: Peaks) -> list[dict]:
        """Per image: FLOPs, bytes and floor (TF32 and BF16 peaks) of the step and of each piece."""
        models = itertools.chain([("step", self.step)], self.pieces.items())
        return [
            {
                "piece": name,
                "flops_per_image": m.per_image.flops,
                "bytes_per_image": m.per_image.bytes,
                "fixed_flops": m.fixed.flops,
                "fixed_bytes": m.fixed.bytes,
                "floor_tf32_ns_per_image": 1e9 * peaks.floor_seconds(m.per_image, "tf32"),
                "floor_bf16_ns_per_image": 1e9 * peaks.floor_seconds(m.per_image, "bf16"),
                "bound": "compute"
                if m.per_image.flops / peaks.tf32_flop_s > m.per_image.bytes / peaks.copy_bytes_s
                else "memory",
            }
            for name, m in models
        ]


def set_against(row: dict, cost: Cost, seconds: float, peaks: Peaks, prefix: str = "") -> None:
    """Add the floor of `cost` and the % of it that `seconds` reaches to row (keys after prefix)."""
    floor_tf32, floor_bf16 = peaks.floor_seconds(cost, "tf32"), peaks.floor_seconds(cost, "bf16")
    row.update(
        {
            f"{prefix}floor_s": floor_tf32,
            f"{prefix}pct_of_floor": 100 * floor_tf32 / seconds,
            f"{prefix}pct_of_bf16_floor": 100 * floor_bf16 / seconds,
        }
    )
