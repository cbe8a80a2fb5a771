"""`python -m bench gpu [--json out.json] [--tiny] [--gpu-budget-s S]`: every GPU suite in one run.

One process, in this order, each phase with its share of a total time budget (default 450 s,
under 8 minutes with start-up on an H100/H200; `--gpu-budget-s` scales every share); time a
phase leaves unused passes to the next:
1. device: the measured peaks (TF32 and BF16 GEMM, device-to-device copy) and the floor model's
   counts (`bench.floors`), also reported per image for the step and each of its pieces;
2. step at 8192 then 1024 images (naive, fast-eager, fast-compiled, as `bench step`), and a
   `torch.profiler` table of the top kernels of the compiled step at 8192 (3 steps profiled after
   the timed ones, on the same runner: no second compile);
3. gradnorm (ghost, vmap at 4096; loop at 256), 4. kernels (`--quick`: the target shapes),
5. evaluate (1,000 reconstructions against the 60,000 MNIST training images), 6. precision: the
   loss trajectory of the step under TF32 / BF16 against fp32 (`bench.precision`), 7. step at
   65536 images.
A unit (one variant at one batch, one backend, one suite) starts only while its phase has time
left for its expected duration (from the H100 runs); otherwise it is recorded as skipped, with the
time that was left. A unit that fails with anything but an out-of-memory error is recorded as an
error (first line of the message) and the run goes on: a device session is short.

Every timed row carries its floor (`bench.floors`: max(FLOPs / TF32 peak, bytes / copy bandwidth)),
`pct_of_floor`, `pct_of_bf16_floor` and `speedup_vs_naive` (step: the naive reference step;
gradnorm: vmap(grad); kernels: the N x N diversity / eager torch TV + pixel), where the suite has a
naive reference at the same size.

`--tiny` (automatic without CUDA) runs the same phases with tiny shapes and without the compiled
step (its cold compile takes minutes on a CPU): the check that the script runs end to end.
`python -m bench.gpu render out.json` prints the JSON as the markdown performance table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench import evaluate, floors, grad_norm, kernels, precision, step
from bench.common import is_oom, print_table, time_fn

SUB_SUITES = (step, grad_norm, kernels, evaluate)
DEFAULT_BUDGET_S = 450.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for suite in SUB_SUITES:
        suite.add_arguments(parser)
    g = parser.add_argument_group("gpu suite")
    g.add_argument(
        "--tiny", action="store_true", help="tiny shapes, no compiled step (default without CUDA)"
    )
    g.add_argument(
        "--gpu-budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"total seconds for all phases, each phase's share scaled to it (default {DEFAULT_BUDGET_S:.0f})",
    )
    g.add_argument(
        "--gpu-phases", nargs="+", default=None, help="run only these phases (default: all)"
    )


@dataclass(frozen=True)
class Unit:
    name: str
    expected_s: float
    run: Callable[[], list[dict]]


@dataclass(frozen=True)
class Phase:
    name: str
    share_s: float
    units: list[Unit]


@dataclass
class Clock:
    """The total budget and the time a finished phase left unused, passed to the next one. A
    phase's share_s is its share of the default budget, scaled to the total."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)
    carried_s: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def share_s(self, phase: Phase) -> float:
        return phase.share_s * self.total_s / DEFAULT_BUDGET_S


def run_phase(phase: Phase, clock: Clock) -> list[dict]:
    """Each unit's rows, tagged with the phase; a unit without the time it expects is skipped."""
    phase_start = clock.elapsed()
    deadline = min(phase_start + clock.share_s(phase) + clock.carried_s, clock.total_s)
    rows = []
    for unit in phase.units:
        left = deadline - clock.elapsed()
        if unit.expected_s > left:
            rows.append(
                {
                    "suite": phase.name,
                    "unit": unit.name,
                    "status": "skipped",
                    "reason": f"time budget: {max(left, 0):.0f} s left in the phase, {unit.expected_s:.0f} s expected",
                }
            )
            continue
        started = time.perf_counter()
        try:
            unit_rows = unit.run()
        except Exception as err:  # recorded, so that one failure does not cost the rest of the run
            unit_rows = [
                {
                    "status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                }
            ]
        wall = time.perf_counter() - started
        for row in unit_rows:
            row.setdefault("suite", phase.name)
            row.setdefault("unit", unit.name)
        unit_rows[0]["unit_wall_s"] = wall
        rows += unit_rows
    clock.carried_s = max(0.0, deadline - clock.elapsed())
    return rows


# -- the step ----------------------------------------------------------------------------------


def top_kernels(run: Callable[[], object], device, steps: int = 3, top: int = 15) -> list[dict]:
    """The `top` operations by self time over `steps` calls of run, under torch.profiler: GPU
    kernels (self device time) on CUDA, CPU operators (self CPU time) elsewhere; ms per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = (
        [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    )
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if on_cuda:
            torch.cuda.synchronize()
    if on_cuda:
        timed = [
            (e, e.self_device_time_total)
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA
        ]
    else:
        timed = [(e, e.self_cpu_time_total) for e in prof.key_averages()]
    timed = [(e, us) for e, us in timed if us > 0]
    total = sum(us for _, us in timed) or 1.0
    timed.sort(key=lambda pair: pair[1], reverse=True)
    return [
        {
            "name": e.key[:160],
            "calls_per_step": e.count / steps,
            "ms_per_step": us / 1e3 / steps,
            "pct": 100 * us / total,
        }
        for e, us in timed[:top]
    ]


def step_unit(
    variant: str,
    batch: int,
    classifier,
    device,
    chunk: int | None,
    repeats: int,
    profile: bool = False,
) -> list[dict]:
    """`bench.step.measure`'s row for one variant and batch (status "oom" when it does not fit), and
    with `profile` a second row holding the top kernels of the same runner."""
    row = {"variant": variant, "device": str(device), "batch": batch}
    if variant != "naive" and chunk is not None and chunk < batch:
        row["classifier_chunk_size"] = chunk
    rows, runner = [row], None
    try:
        runner = step.make_runner(variant, batch, classifier, device, chunk)
        if variant == "fast-compiled":
            runner()  # compiles; on CUDA the graph is captured in the warm-up call
            row["compile_s"] = runner.step.compile_seconds
        timing = time_fn(runner, device=device, warmup=1, repeats=repeats, max_seconds=30)
        row.update(
            status="ok",
            median_s=timing.median_s,
            min_s=timing.min_s,
            repeats=timing.repeats,
            images_per_s=batch / timing.median_s,
        )
        if profile:
            rows.append(
                {
                    "suite": "profile",
                    "variant": variant,
                    "batch": batch,
                    "kernels": top_kernels(runner, device),
                }
            )
    except Exception as err:
        if not is_oom(err):
            raise
        row["status"] = "oom"
    finally:
        del runner
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """The sizes of one plan: the full GPU run or the tiny end-to-end check."""

    step_batches: tuple[int, ...]
    step_variants: tuple[str, ...]
    step_large_batches: tuple[int, ...]
    step_large_variants: tuple[str, ...]  # the one that fits first
    profile_batch: int
    profiled_variant: str
    step_repeats: int
    gn_batch: int
    gn_loop_batch: int
    kernels_n: list[int] | None
    kernels_d: list[int] | None
    evaluate_quick: bool
    evaluate_impl: str
    precision_batch: int
    precision_steps: int
    precisions: tuple[str, ...]
    count_batches: tuple[int, int]
    # Expected seconds of a unit, from the H100 runs (compile times dominate the compiled step).
    expected_s: Callable[[str, str, int], float]


def _h100_expected_s(suite: str, variant: str, batch: int) -> float:
    if suite == "step":
        if "compiled" in variant:
            return 170.0 if batch > 16384 else 60.0
        return 10.0 if batch > 16384 else 6.0
    return {
        "gradnorm": 30.0 if variant == "loop" else 8.0,
        "kernels": 75.0,
        "evaluate": 12.0,
        "precision": 12.0,
        "device": 10.0,
    }.get(suite, 0.0)


FULL = Shapes(
    step_batches=(8192, 1024),
    step_variants=step.VARIANTS,
    step_large_batches=(65536,),
    step_large_variants=("fast-compiled", "fast-eager", "naive"),
    profile_batch=8192,
    profiled_variant="fast-compiled",
    step_repeats=5,
    gn_batch=4096,
    gn_loop_batch=256,
    kernels_n=None,
    kernels_d=None,
    evaluate_quick=False,
    evaluate_impl="auto",
    precision_batch=1024,
    precision_steps=30,
    precisions=("tf32", "bf16"),
    count_batches=(512, 1024),
    expected_s=_h100_expected_s,
)
TINY = Shapes(
    step_batches=(8,),
    step_variants=("naive", "fast-eager"),
    step_large_batches=(16,),
    step_large_variants=("fast-eager",),
    profile_batch=8,
    profiled_variant="fast-eager",
    step_repeats=2,
    gn_batch=8,
    gn_loop_batch=4,
    kernels_n=[64],
    kernels_d=[16],
    evaluate_quick=True,
    evaluate_impl="eager",
    precision_batch=8,
    precision_steps=2,
    precisions=("bf16",),
    count_batches=(4, 8),
    expected_s=lambda suite, variant, batch: 0.0,
)


def _suite_args(args, **overrides) -> argparse.Namespace:
    ns = copy.copy(args)
    for key, value in overrides.items():
        setattr(ns, key, value)
    return ns


def _step_units(shapes: Shapes, batches, classifier, device, variants) -> list[Unit]:
    on_gpu = torch.device(device).type == "cuda"
    units = []
    for batch in batches:
        for variant in variants:
            chunk = step.GPU_CHUNKS.get(variant) if on_gpu else None
            profile = batch == shapes.profile_batch and variant == shapes.profiled_variant
            units.append(
                Unit(
                    f"{variant} B={batch}",
                    shapes.expected_s("step", variant, batch),
                    lambda v=variant, b=batch, c=chunk, p=profile: step_unit(
                        v, b, classifier, device, c, shapes.step_repeats, p
                    ),
                )
            )
    return units


def plan(args, shapes: Shapes, device, state: dict) -> list[Phase]:
    """The phases; `state` receives the peaks and floors that the device phase measures."""
    classifier = step.bench_classifier(device)
    expected = shapes.expected_s

    def device_unit():
        state["peaks"] = floors.measure_peaks(device, tiny=shapes is TINY)
        state["floors"] = floors.Floors.count_on(classifier, device, shapes.count_batches)
        return [
            {"piece": "peaks", **state["peaks"].as_row()},
            *state["floors"].rows(state["peaks"]),
        ]

    def gradnorm_unit(backend):
        return lambda: grad_norm.run(
            _suite_args(
                args,
                gn_backends=backend,
                gn_batch=shapes.gn_batch,
                gn_loop_batch=shapes.gn_loop_batch,
                gn_compile=False,
                gn_max_batch=False,
                gn_threads=None,
                quick=shapes is TINY,
            )
        )

    variants = args.step_variants or shapes.step_variants
    large_variants = [v for v in shapes.step_large_variants if v in variants]
    return [
        Phase(
            "device", 15, [Unit("peaks and floor counts", expected("device", "", 0), device_unit)]
        ),
        Phase("step", 145, _step_units(shapes, shapes.step_batches, classifier, device, variants)),
        Phase(
            "gradnorm",
            25,
            [Unit(b, expected("gradnorm", b, 0), gradnorm_unit(b)) for b in grad_norm.BACKENDS],
        ),
        Phase(
            "kernels",
            75,
            [
                Unit(
                    "kernels",
                    expected("kernels", "", 0),
                    lambda: kernels.run(
                        _suite_args(
                            args, quick=True, kernels_n=shapes.kernels_n, kernels_d=shapes.kernels_d
                        )
                    ),
                )
            ],
        ),
        Phase(
            "evaluate",
            15,
            [
                Unit(
                    "evaluate",
                    expected("evaluate", "", 0),
                    lambda: evaluate.run(
                        _suite_args(args, quick=shapes.evaluate_quick, impl=shapes.evaluate_impl)
                    ),
                )
            ],
        ),
        Phase(
            "precision",
            15,
            [
                Unit(
                    "precision",
                    expected("precision", "", 0),
                    lambda: precision.deviation_rows(
                        shapes.precision_batch, shapes.precision_steps, device, shapes.precisions
                    ),
                )
            ],
        ),
        Phase(
            "step",
            160,
            _step_units(shapes, shapes.step_large_batches, classifier, device, large_variants),
        ),
    ]


# -- floors and ratios on the rows -------------------------------------------------------------


def annotate(rows: list[dict], state: dict) -> None:
    """Floors, % of floor and speedup over the naive reference on every timed row (in place)."""
    peaks, model = state.get("peaks"), state.get("floors")
    by_suite: dict[str, list[dict]] = {}
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    step_rows = [r for r in by_suite.get("step", []) if "images_per_s" in r]
    step.add_speedups(step_rows)
    _add_reference_speedups(by_suite.get("gradnorm", []), ("batch",), "backend", "vmap")
    for loss, reference in (("diversity", "naive"), ("tv_pixel", "torch")):
        _add_reference_speedups(
            [r for r in by_suite.get("kernels", []) if r.get("loss") == loss],
            ("pass", "N", "D", "image"),
            "variant",
            reference,
        )
    if peaks is None or model is None:
        return
    for r in step_rows:
        floors.set_against(r, model.step.at(r["batch"]), r["median_s"], peaks)
    for r in by_suite.get("gradnorm", []):
        if "median_s" in r:
            norms, baseline = (
                model.pieces["ghost_norms"].at(r["batch"]),
                model.pieces["classifier"].at(r["batch"]),
            )
            floors.set_against(r, norms, r["median_s"], peaks)
            floors.set_against(r, baseline, r["baseline_s"], peaks, "baseline_")
            r["R_at_floor"] = peaks.floor_seconds(norms) / peaks.floor_seconds(baseline)
    for r in by_suite.get("evaluate", []):
        if "matrices_s" in r:
            pair = model.ssim_pair
            floors.set_against(
                r,
                floors.Cost(pair.flops * r["pairs"], pair.bytes * r["pairs"]),
                r["matrices_s"],
                peaks,
                "matrices_",
            )


def _add_reference_speedups(
    rows: list[dict], keys: tuple[str, ...], variant_key: str, reference: str
) -> None:
    """speedup_vs_naive = the reference variant's median time over the row's, at the same keys."""
    times = {
        tuple(r.get(k) for k in keys): r["median_s"]
        for r in rows
        if r.get(variant_key) == reference and "median_s" in r
    }
    for r in rows:
        ref = times.get(tuple(r.get(k) for k in keys))
        if ref is not None and "median_s" in r:
            r["speedup_vs_naive"] = ref / r["median_s"]


# -- running and printing ----------------------------------------------------------------------


def run(args) -> list[dict]:
    device = torch.device(args.device)
    shapes = TINY if args.tiny or device.type != "cuda" else FULL
    clock, state = Clock(args.gpu_budget_s), {}
    phases = plan(args, shapes, device, state)
    rows = [
        {
            "suite": "plan",
            "shapes": "tiny" if shapes is TINY else "full",
            "budget_s": args.gpu_budget_s,
            "device": str(device),
            "phases": [
                {"name": p.name, "share_s": p.share_s, "units": len(p.units)} for p in phases
            ],
        }
    ]
    for phase in phases:
        if args.gpu_phases is None or phase.name in args.gpu_phases:
            rows += run_phase(phase, clock)
    annotate(rows, state)
    rows[0]["wall_s"] = clock.elapsed()
    return rows


def print_rows(rows: list[dict]) -> None:
    """One table per suite (their columns differ), and the profile as its own table."""
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    for suite in suites:
        group = [r for r in rows if r["suite"] == suite]
        print(f"\n-- {suite} --")
        if suite == "profile":
            for r in group:
                print(f"{r['variant']} B={r['batch']}")
                print_table(r["kernels"], ["name", "calls_per_step", "ms_per_step", "pct"])
            continue
        print_table(
            group,
            list(
                dict.fromkeys(
                    k
                    for r in group
                    for k in r
                    if k != "suite" and not isinstance(r[k], (dict, list))
                )
            ),
        )


# -- the markdown table ------------------------------------------------------------------------


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(v) for v in line) + " |" for line in lines]


def performance_table(payload: dict) -> str:
    """The `bench gpu` JSON (as written by `python -m bench gpu --json`) as markdown tables."""
    rows = payload["suites"]["gpu"]
    env = payload.get("environment", {})
    by_suite: dict[str, list[dict]] = {}
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    plan_row = by_suite["plan"][0]
    out = [
        f"Device: {env.get('device_name', plan_row['device'])}, torch {env.get('torch', '?')}, "
        f"{plan_row['shapes']} shapes, {plan_row.get('wall_s', 0):.0f} s of a {plan_row['budget_s']:.0f} s budget."
    ]
    peaks = next((r for r in by_suite.get("device", []) if r.get("piece") == "peaks"), None)
    if peaks:
        out += [
            "",
            f"Measured peaks: TF32 GEMM {peaks['tf32_tflop_s']:.3g} TFLOP/s, BF16 GEMM "
            f"{peaks['bf16_tflop_s']:.3g} TFLOP/s, copy {peaks['copy_gb_s']:.4g} GB/s.",
            "",
        ]
        out += _table(
            [
                "piece",
                "MFLOP / image",
                "MB / image",
                "floor TF32 (us / 1k images)",
                "floor BF16",
                "bound",
            ],
            [
                [
                    r["piece"],
                    r["flops_per_image"] / 1e6,
                    r["bytes_per_image"] / 1e6,
                    r["floor_tf32_ns_per_image"],
                    r["floor_bf16_ns_per_image"],
                    r["bound"],
                ]
                for r in by_suite["device"]
                if r.get("piece") != "peaks"
            ],
        )
    step_rows = [r for r in by_suite.get("step", []) if "variant" in r]
    out += ["", "Step (nine terms, PaperCNN, one generator):", ""]
    out += _table(
        [
            "variant",
            "batch",
            "status",
            "images/s",
            "ms / step",
            "x naive",
            "% of floor",
            "% of BF16 floor",
            "compile s",
        ],
        [
            [
                r["variant"],
                r["batch"],
                r.get("status"),
                r.get("images_per_s"),
                r["median_s"] * 1e3 if "median_s" in r else None,
                r.get("speedup_vs_naive"),
                r.get("pct_of_floor"),
                r.get("pct_of_bf16_floor"),
                r.get("compile_s"),
            ]
            for r in step_rows
        ],
    )
    for r in by_suite.get("profile", []):
        out += ["", f"Top kernels, {r['variant']} at B = {r['batch']}:", ""]
        out += _table(
            ["kernel", "calls / step", "ms / step", "%"],
            [
                [k["name"][:80].replace("|", "/"), k["calls_per_step"], k["ms_per_step"], k["pct"]]
                for k in r["kernels"][:10]
            ],
        )
    out += ["", "Gradient norms (value and d/dx; R = time over one plain forward + backward):", ""]
    out += _table(
        ["backend", "batch", "R", "R at floor", "x naive (vmap)", "% of floor"],
        [
            [
                r["backend"],
                r["batch"],
                r.get("R"),
                r.get("R_at_floor"),
                r.get("speedup_vs_naive"),
                r.get("pct_of_floor"),
            ]
            for r in by_suite.get("gradnorm", [])
            if "backend" in r
        ],
    )
    kernel_rows = [
        r
        for r in by_suite.get("kernels", [])
        if r.get("loss") in ("diversity", "tv_pixel") and "median_s" in r
    ]
    out += ["", "Loss kernels:", ""]
    out += _table(
        [
            "loss",
            "variant",
            "pass",
            "N",
            "D / image",
            "ms",
            "x naive",
            "% of floor",
            "% of copy bw",
        ],
        [
            [
                r["loss"],
                r["variant"],
                r["pass"],
                r["N"],
                r.get("D", r.get("image")),
                r["median_s"] * 1e3,
                r.get("speedup_vs_naive"),
                r.get("pct_of_floor"),
                r.get("pct_copy_bw"),
            ]
            for r in kernel_rows
        ],
    )
    out += ["", "Evaluation (per-class SSIM matrices + Hungarian matching):", ""]
    out += _table(
        ["recon", "train", "total s", "matrices s", "% of floor (matrices)", "x naive"],
        [
            [
                r["recon"],
                r["train"],
                r["total_s"],
                r["matrices_s"],
                r.get("matrices_pct_of_floor"),
                None,
            ]
            for r in by_suite.get("evaluate", [])
            if "total_s" in r
        ],
    )
    out += ["", "Loss trajectory against fp32 (relative deviation of the total loss):", ""]
    out += _table(
        ["precision", "batch", "steps", "max", "mean", "final"],
        [
            [
                r["precision"],
                r["batch"],
                r["steps"],
                r["max_rel_dev"],
                r["mean_rel_dev"],
                r["final_rel_dev"],
            ]
            for r in by_suite.get("precision", [])
            if "precision" in r
        ],
    )
    not_run = [r for r in rows if str(r.get("status", "")).startswith(("skipped", "error"))]
    if not_run:
        out += ["", "Not run:", ""] + [
            f"- {r['suite']} {r.get('unit', '')}: {r.get('reason', r['status'])}" for r in not_run
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description="render a `bench gpu` JSON"
    )
    parser.add_argument("command", choices=["render"])
    parser.add_argument("json_path")
    args = parser.parse_args(argv)
    import json

    try:
        with open(args.json_path) as fh:
            payload = json.load(fh)
        text = performance_table(payload)
    except (OSError, ValueError, KeyError) as err:
        print(
            f"json_path {args.json_path!r}: not a readable `bench gpu` JSON ({type(err).__name__}: {err})",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
