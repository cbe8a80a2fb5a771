"""`python -m bench.gate`: the CI benchmark regression gate.

A quick pass (well under 3 minutes on 2 cores) that measures speedup ratios, fast over naive in
the same run, and fails (exit 1) if any ratio falls more than `tolerance` (25%) below the
threshold committed in bench/baseline.json. Ratios, not absolute times, because CI machines differ
and are noisy; each side is timed as the median of the process's CPU time on one thread, which
other jobs sharing the cores barely disturb.

Ratios (PaperCNN on MNIST-size images, 10 classes):
- step_fast_eager_vs_naive: images/s of the nine-term reconstruction step, the engine's eager step
  over the naive reference (bench.naive_step), batch 64;
- grad_norm_ghost_vs_vmap: the per-sample gradient-norm term and its gradient to the images
  (a double backward), ghost backend over vmap(grad), batch 64;
- diversity_identity_vs_gram: cosine + ortho diversity and their gradient, the engine's
  O(N D + D^2) identities over the N x N Gram matrices, N = 4096, D = 256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.common import cpu_seconds, environment, write_json
from bench.naive_step import naive_diversity, naive_grad_norms
from bench.step import IMAGE_SHAPE, NUM_CLASSES, bench_classifier, make_runner
from tldr_fast import losses
from tldr_fast.grad_norm import per_sample_grad_norm

BASELINE = Path(__file__).with_name("baseline.json")
STEP_BATCH = 64
GRAD_NORM_BATCH = 64
DIVERSITY_SHAPE = (4096, 256)


def _with_input_grad(loss_fn, x):
    def run():
        xi = x.detach().requires_grad_(True)
        loss_fn(xi).backward()

    return run


def measure_ratios(repeats: int = 5) -> dict[str, dict[str, float]]:
    """{ratio name: {"fast_s", "naive_s", "ratio"}}, timed on the CPU."""
    torch.manual_seed(0)
    classifier = bench_classifier("cpu")
    images = torch.rand(GRAD_NORM_BATCH, *IMAGE_SHAPE)
    labels = torch.arange(GRAD_NORM_BATCH) % NUM_CLASSES
    feat = torch.randn(*DIVERSITY_SHAPE)
    pairs = {
        "step_fast_eager_vs_naive": (
            make_runner("fast-eager", STEP_BATCH, classifier, "cpu"),
            make_runner("naive", STEP_BATCH, classifier, "cpu"),
        ),
        "grad_norm_ghost_vs_vmap": (
            _with_input_grad(
                lambda x: per_sample_grad_norm(classifier, x, labels, backend="ghost").mean(),
                images,
            ),
            _with_input_grad(lambda x: naive_grad_norms(classifier, x, labels).mean(), images),
        ),
        "diversity_identity_vs_gram": (
            _with_input_grad(lambda f: sum(losses.diversity_losses(f, impl="torch")), feat),
            _with_input_grad(lambda f: sum(naive_diversity(f)), feat),
        ),
    }
    results = {}
    for name, (fast, naive) in pairs.items():
        fast_s, naive_s = cpu_seconds(fast, repeats=repeats), cpu_seconds(naive, repeats=repeats)
        results[name] = {"fast_s": fast_s, "naive_s": naive_s, "ratio": naive_s / fast_s}
    return results


def check(measured: dict[str, dict[str, float]], baseline: dict) -> list[str]:
    """Failure messages, one per ratio more than `tolerance` below its threshold."""
    tolerance = baseline["tolerance"]
    failures = []
    for name, entry in baseline["ratios"].items():
        if name not in measured:
            failures.append(f"{name}: in {BASELINE.name} but not measured")
            continue
        floor = (1 - tolerance) * entry["threshold"]
        value = measured[name]["ratio"]
        if value < floor:
            failures.append(
                f"{name}: measured speedup {value:.2f}x is more than {tolerance:.0%} below the "
                f"threshold {entry['threshold']:.2f}x (floor {floor:.2f}x)"
            )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--baseline", type=Path, default=BASELINE, help="thresholds (default: bench/baseline.json)"
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="write the measurements here"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (median)")
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        measured = measure_ratios(args.repeats)
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    for name, m in measured.items():
        threshold = baseline["ratios"].get(name, {}).get("threshold")
        print(
            f"{name:30s} {m['ratio']:6.2f}x  (fast {m['fast_s']:.3f} s, naive {m['naive_s']:.3f} s CPU; "
            f"threshold {threshold}x)"
        )
    print(f"gate pass took {wall:.0f} s")
    if args.json_path:
        write_json(
            args.json_path, {"environment": environment(), "ratios": measured, "wall_s": wall}
        )
    failures = check(measured, baseline)
    for failure in failures:
        print(f"REGRESSION {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
