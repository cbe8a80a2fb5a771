"""`python -m bench step`: images per second of the full nine-term reconstruction step.

Variants, each on the same classifier (PaperCNN, MNIST 28x28, 10 classes) and the same config
(all nine terms, one generator of the default width, batch B per step):
- `naive`: the reference written from the paper (`bench.naive_step`: N x N Gram, vmap(grad) norms,
  torch.optim.Adam, eager);
- `fast-eager`: the engine's pure step (`engine.make_step`: diversity identities, ghost norms,
  functional Adam), eager;
- `fast-compiled`: the same step under `tldr_fast.compiled.CompiledStep` (torch.compile fullgraph;
  on CUDA replayed as a CUDA graph), impl="auto"; its first call is reported as `compile_s`, apart
  from the step time;
- `fast-compiled-kernels` (CUDA only): the compiled step with impl="triton", the fused diversity
  and TV/pixel kernels launched inside the graph instead of Inductor's fusion of the torch path.
  On a CPU the kernels only run in the Triton interpreter, which is for correctness, not timing.
Each row: variant, batch, median step seconds, images/s and the speedup over `naive` at the same
batch (same run). On a CPU the variants are timed in the same rounds, each round running every
variant's step once back to back in rotated order, and the speedup is the median of the per-round
ratios (the 2-core dev box drifts by up to 30% between rounds); on CUDA, where each variant is
timed on its own (the large batches would not fit side by side), it is the ratio of images/s.
On CUDA the fast variants run the classifier on chunks of the batch beyond 4096 (eager) / 16384
(compiled) images (`classifier_chunk_size`, `--step-chunk`; the row says so), which is what lets
the compiled one fit 65536 images; the naive reference never chunks. On CUDA the default batches
are 1024, 8192 and 65536, then each variant's batch is doubled until it runs out of memory
(`--step-max-batch`) to find the largest it fits.
`--step-cache-check` compiles the step in two fresh processes sharing an empty TorchInductor cache
and reports both compile times (the second reuses the first one's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from bench.common import Timing, interleaved_times, is_oom, median_ratio, time_fn
from bench.naive_step import NaiveStep
from tldr_fast import conditioning, objective
from tldr_fast.compiled import CompiledStep
from tldr_fast.config import ReconstructionConfig
from tldr_fast.engine import AdamState, make_step
from tldr_fast.models import PaperCNN

VARIANTS = ("naive", "fast-eager", "fast-compiled", "fast-compiled-kernels")
CPU_VARIANTS = VARIANTS[:3]
COMPILED = ("fast-compiled", "fast-compiled-kernels")
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
CPU_BATCHES, CPU_QUICK_BATCHES = (256,), (64,)
GPU_BATCHES, GPU_QUICK_BATCHES = (1024, 8192, 65536), (1024,)
# The fast variants' classifier_chunk_size on CUDA for larger batches: the compiled step's chunk loop
# is unrolled into its graph (fewer chunks: shorter compile) and needs less memory per image.
GPU_CHUNKS = {"fast-eager": 4096, "fast-compiled": 16384, "fast-compiled-kernels": 16384}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("step suite")
    g.add_argument(
        "--step-batches",
        type=int,
        nargs="+",
        default=None,
        help="images per step (default: 256 on CPU, 1024 8192 65536 on CUDA; --quick: 64 / 1024)",
    )
    g.add_argument(
        "--step-variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="default: all four on CUDA, the first three on a CPU (fast-compiled-kernels is "
        "CUDA only); with --quick on a CPU naive and fast-eager (a cold compile of the "
        "step takes minutes there)",
    )
    g.add_argument(
        "--step-max-batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="double each variant's batch until out of memory (default: on CUDA without --quick)",
    )
    g.add_argument(
        "--step-max-batch-limit", type=int, default=1 << 20, help="stop the doubling here"
    )
    g.add_argument(
        "--step-chunk",
        type=int,
        default=None,
        help="classifier_chunk_size of the fast variants when the batch is larger (default on CUDA: "
        "4096 eager, 16384 compiled; none on CPU); the naive reference never chunks",
    )
    g.add_argument(
        "--step-cache-check",
        action="store_true",
        help="compile time in two fresh processes sharing an empty compile cache",
    )


def step_config(batch: int, chunk: int | None = None, impl: str = "auto") -> ReconstructionConfig:
    """The paper preset with all nine terms on (eta_pix is 0 in the preset) and one generator."""
    return ReconstructionConfig(
        num_generators=1, batch_size=batch, eta_pix=1.0, classifier_chunk_size=chunk, impl=impl
    )


def bench_classifier(device) -> torch.nn.Module:
    torch.manual_seed(0)
    return PaperCNN(1, NUM_CLASSES, IMAGE_SHAPE[1:]).to(device).eval().requires_grad_(False)


def make_runner(variant: str, batch: int, classifier, device, chunk: int | None = None):
    """A zero-argument callable taking one training step of `variant` (state kept inside)."""
    if variant == "naive":
        return NaiveStep(classifier, step_config(batch), IMAGE_SHAPE, device)
    if variant == "fast-compiled-kernels" and torch.device(device).type != "cuda":
        raise ValueError(
            f"the fast-compiled-kernels variant runs on CUDA only, got device {device}"
        )
    # make_step takes the whole-batch path when chunk >= batch
    cfg = step_config(batch, chunk, impl="triton" if variant == "fast-compiled-kernels" else "auto")
    template, params, buffers = objective.build_generators(cfg, NUM_CLASSES, IMAGE_SHAPE, device)
    labels = conditioning.balanced_labels(batch, NUM_CLASSES, device)[None]
    step = make_step(objective.Problem(template, classifier, cfg, labels), buffers)
    if variant in COMPILED:
        step = CompiledStep(step)
    carry = [params, AdamState.zeros_like(params)]

    def run():
        carry[0], carry[1], report = step(*carry)
        return report

    run.step = step
    return run


def _new_row(variant: str, batch: int, device, chunk: int | None) -> dict:
    row = {"variant": variant, "device": str(device), "batch": batch}
    if variant != "naive" and chunk is not None and chunk < batch:
        row["classifier_chunk_size"] = chunk
    return row


def _ready_runner(variant: str, batch: int, classifier, device, chunk: int | None, row: dict):
    """make_runner, and for the compiled variant its first (compiling) call, timed into row."""
    runner = make_runner(variant, batch, classifier, device, chunk)
    if variant in COMPILED:
        runner()  # compiles; a CUDA graph is captured on the next call, inside the warm-up
        row["compile_s"] = runner.step.compile_seconds
    return runner


def _record(row: dict, batch: int, timing: Timing) -> dict:
    row.update(
        status="ok",
        median_s=timing.median_s,
        min_s=timing.min_s,
        repeats=timing.repeats,
        images_per_s=batch / timing.median_s,
    )
    return row


def measure(
    variant: str,
    batch: int,
    classifier,
    device,
    quick: bool,
    searching: bool = False,
    chunk: int | None = None,
) -> dict:
    """One row: median step time and images/s, or status 'oom'.

    searching: while looking for the largest batch, any failure counts as not fitting (status
    'error: ...'): an allocation failing inside CUDA graph capture surfaces as a capture error.
    """
    row = _new_row(variant, batch, device, chunk)
    runner = None
    try:
        runner = _ready_runner(variant, batch, classifier, device, chunk, row)
        timing = time_fn(
            runner,
            device=device,
            warmup=1,
            repeats=3 if quick else 5,
            max_seconds=10 if quick else 60,
        )
    except Exception as err:
        if not (is_oom(err) or searching):
            raise
        row["status"] = "oom" if is_oom(err) else f"error: {str(err).splitlines()[0][:200]}"
        return row
    finally:
        del runner
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return _record(row, batch, timing)


def measure_interleaved(
    variants: list[str], batch: int, classifier, device, quick: bool, chunk=lambda variant: None
) -> list[dict]:
    """One row per variant, all timed in the same rounds (`bench.common.interleaved_times`: each
    round runs every variant's step once, in rotated order); speedup_vs_naive is the median over
    rounds of the naive step's time over the variant's, so the machine's drift between rounds
    cancels out of it."""
    rows = [_new_row(v, batch, device, chunk(v)) for v in variants]
    runners = [
        _ready_runner(v, batch, classifier, device, chunk(v), row)
        for v, row in zip(variants, rows, strict=True)
    ]
    times = interleaved_times(
        runners,
        device,
        warmup=1,
        repeats=3 if quick else 7,
        max_seconds=(10 if quick else 60) * len(variants),
    )
    for row, ts in zip(rows, times, strict=True):
        _record(row, batch, Timing.of(ts))
    if "naive" in variants:
        naive_times = times[variants.index("naive")]
        for row, ts in zip(rows, times, strict=True):
            row["speedup_vs_naive"] = median_ratio(naive_times, ts)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_naive = images/s over the naive variant's at the same batch (same run)."""
    naive = {
        r["batch"]: r["images_per_s"]
        for r in rows
        if r["variant"] == "naive" and r["status"] == "ok"
    }
    for r in rows:
        if r["status"] == "ok" and r["batch"] in naive:
            r["speedup_vs_naive"] = r["images_per_s"] / naive[r["batch"]]


def largest_batch(
    variant: str, start: int, limit: int, classifier, device, chunk: int | None = None
) -> dict:
    """Double the batch from `start` (which fits) until out of memory or past `limit`."""
    fits, batch = start, 2 * start
    while (
        batch <= limit
        and measure(variant, batch, classifier, device, quick=True, searching=True, chunk=chunk)[
            "status"
        ]
        == "ok"
    ):
        fits, batch = batch, 2 * batch
    return {
        "variant": variant,
        "device": str(device),
        "batch": fits,
        "status": "largest",
        "limit_reached": batch > limit,
    }


def compile_probe(batch: int, device: str) -> None:
    """Child process of the cache check: print the compile seconds of a fresh compiled step."""
    runner = make_runner("fast-compiled", batch, bench_classifier(device), device)
    runner()
    print(json.dumps({"compile_s": runner.step.compile_seconds}))


def cache_check(batch: int, device: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tldr-inductor-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        code = f"from bench.step import compile_probe; compile_probe({batch}, {device!r})"
        for run in ("cold cache", "warm cache"):
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
            )
            seconds = json.loads(out.stdout.strip().splitlines()[-1])["compile_s"]
            rows.append(
                {
                    "variant": "fast-compiled",
                    "device": device,
                    "batch": batch,
                    "status": run,
                    "compile_s": seconds,
                }
            )
    return rows


def run(args) -> list[dict]:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batches = args.step_batches or (
        (GPU_QUICK_BATCHES if args.quick else GPU_BATCHES)
        if on_gpu
        else (CPU_QUICK_BATCHES if args.quick else CPU_BATCHES)
    )
    variants = args.step_variants or (
        VARIANTS if on_gpu else CPU_VARIANTS[:2] if args.quick else CPU_VARIANTS
    )
    if not on_gpu and "fast-compiled-kernels" in variants:
        raise ValueError(
            "--step-variants fast-compiled-kernels needs --device cuda: on a CPU the Triton "
            "interpreter is for correctness only and is not timed"
        )
    classifier = bench_classifier(device)

    def chunk(variant):
        return (
            args.step_chunk
            if args.step_chunk is not None
            else (GPU_CHUNKS.get(variant) if on_gpu else None)
        )

    if on_gpu:
        rows = [
            measure(v, b, classifier, device, args.quick, chunk=chunk(v))
            for b in batches
            for v in variants
        ]
        add_speedups(rows)
    else:
        rows = [
            row
            for b in batches
            for row in measure_interleaved(list(variants), b, classifier, device, args.quick, chunk)
        ]
    search = args.step_max_batch if args.step_max_batch is not None else (on_gpu and not args.quick)
    if search:
        for variant in variants:
            fitting = [r["batch"] for r in rows if r["variant"] == variant and r["status"] == "ok"]
            if fitting:
                rows.append(
                    largest_batch(
                        variant,
                        max(fitting),
                        args.step_max_batch_limit,
                        classifier,
                        device,
                        chunk(variant),
                    )
                )
    if args.step_cache_check:
        rows += cache_check(min(batches), str(device))
    return rows
