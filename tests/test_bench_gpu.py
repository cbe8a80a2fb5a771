"""`python -m bench gpu` end to end on the CPU (tiny shapes), its time budget, the rows' floors and
ratios, the precision switch and trajectory, and the markdown table rendered from its JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import __main__ as bench_main
from bench import gpu, precision

# kernels and evaluate are left to their own suites' tests: on a CPU their compiles and the 6,000
# training images take minutes; their rows are annotated below from synthetic rows.
PHASES = ["device", "step", "gradnorm", "precision"]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "out.json"
    # no budget to run out of (every phase's share scales with it): how long the tiny run takes
    # depends on the machine's load
    assert (
        bench_main.main(
            [
                "gpu",
                "--device",
                "cpu",
                "--json",
                str(path),
                "--gpu-budget-s",
                "1e9",
                "--gpu-phases",
                *PHASES,
            ]
        )
        == 0
    )
    return json.loads(path.read_text())


def rows_of(payload, suite):
    return [r for r in payload["suites"]["gpu"] if r["suite"] == suite]


def test_tiny_run_covers_the_phases_with_floors_and_ratios(payload):
    plan = rows_of(payload, "plan")[0]
    assert plan["shapes"] == "tiny" and plan["wall_s"] > 0
    assert [p["name"] for p in plan["phases"]] == [
        "device",
        "step",
        "gradnorm",
        "kernels",
        "evaluate",
        "precision",
        "step",
    ]
    peaks = next(r for r in rows_of(payload, "device") if r["piece"] == "peaks")
    assert all(peaks[k] > 0 for k in ("tf32_tflop_s", "bf16_tflop_s", "copy_gb_s"))
    steps = {(r["variant"], r["batch"]): r for r in rows_of(payload, "step")}
    assert set(steps) == {("naive", 8), ("fast-eager", 8), ("fast-eager", 16)}
    assert all(
        r["status"] == "ok" and math.isfinite(r["pct_of_floor"]) and r["pct_of_floor"] > 0
        for r in steps.values()
    )
    assert (
        steps[("naive", 8)]["speedup_vs_naive"] == 1.0
        and steps[("fast-eager", 8)]["speedup_vs_naive"] > 0
    )
    assert steps[("fast-eager", 8)]["floor_s"] < steps[("fast-eager", 16)]["floor_s"]
    gradnorm = {r["backend"]: r for r in rows_of(payload, "gradnorm")}
    assert set(gradnorm) == {"ghost", "vmap", "loop"}
    assert gradnorm["vmap"]["speedup_vs_naive"] == 1.0 and gradnorm["ghost"]["R_at_floor"] > 1
    assert all(r["pct_of_floor"] > 0 and r["baseline_pct_of_floor"] > 0 for r in gradnorm.values())


def test_profile_lists_the_top_operations_of_the_profiled_step(payload):
    (profile,) = rows_of(payload, "profile")
    assert profile["variant"] == "fast-eager" and profile["batch"] == 8
    shares = [k["pct"] for k in profile["kernels"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100 + 1e-9
    assert any("conv" in k["name"] for k in profile["kernels"])


def test_precision_rows_bf16_moves_the_trajectory_fp32_repeat_does_not(payload):
    rows = {r["precision"]: r for r in rows_of(payload, "precision")}
    assert set(rows) == {"fp32-repeat", "bf16"}
    assert rows["fp32-repeat"]["max_rel_dev"] == 0.0  # the CPU step is deterministic
    assert 0 < rows["bf16"]["max_rel_dev"] < 0.1 and math.isfinite(rows["bf16"]["final_loss"])


def test_markdown_table_renders_the_cpu_json(payload, tmp_path, capsys):
    text = gpu.performance_table(payload)
    assert "| fast-eager | 8 | ok |" in text
    assert (
        "Measured peaks: TF32 GEMM" in text
        and "| ghost | 8 |" in text
        and "| bf16 | 8 | 2 |" in text
    )
    assert "nan" not in text.lower()
    path = tmp_path / "out.json"
    path.write_text(json.dumps(payload))
    assert gpu.main(["render", str(path)]) == 0
    assert capsys.readouterr().out == text


def test_render_of_a_missing_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert gpu.main(["render", str(missing)]) == 2
    assert f"json_path '{missing}'" in capsys.readouterr().err


def test_a_unit_without_the_time_it_expects_is_skipped_and_an_error_recorded():
    def fails():
        raise RuntimeError("broken\nsecond line")

    units = [
        gpu.Unit("quick", 0.0, lambda: [{"value": 1}]),
        gpu.Unit("slow", 1e9, lambda: [{"value": 2}]),
        gpu.Unit("fails", 0.0, fails),
    ]
    clock = gpu.Clock(total_s=gpu.DEFAULT_BUDGET_S)  # shares as given
    rows = gpu.run_phase(gpu.Phase("demo", 10.0, units), clock)
    assert [r["unit"] for r in rows] == ["quick", "slow", "fails"]
    assert rows[0]["value"] == 1 and rows[0]["suite"] == "demo" and rows[0]["unit_wall_s"] >= 0
    assert (
        rows[1]["status"] == "skipped"
        and "s left in the phase, 1000000000 s expected" in rows[1]["reason"]
    )
    assert rows[2]["status"] == "error: RuntimeError: broken"
    assert 9.0 < clock.carried_s <= 10.0  # the unused share passes to the next phase
    late = gpu.run_phase(
        gpu.Phase(
            "late",
            0.0,
            [
                gpu.Unit("fits", 5.0, lambda: [{"value": 3}]),
                gpu.Unit("too long", 50.0, lambda: [{}]),
            ],
        ),
        clock,
    )
    assert late[0]["value"] == 3 and late[1]["status"] == "skipped"
    over = gpu.run_phase(
        gpu.Phase("over", 1e6, [gpu.Unit("any", 150.0, lambda: [{}])]), gpu.Clock(total_s=100.0)
    )
    assert over[0]["status"] == "skipped"  # the total budget caps every phase
    assert gpu.Clock(total_s=2 * gpu.DEFAULT_BUDGET_S).share_s(gpu.Phase("x", 10.0, [])) == 20.0


def test_annotate_sets_kernel_and_evaluate_rows_against_their_references():
    from bench import floors

    rows = [
        {
            "suite": "kernels",
            "loss": "diversity",
            "variant": v,
            "pass": "fwd",
            "N": 64,
            "D": 16,
            "median_s": t,
        }
        for v, t in (("naive", 4.0), ("identity", 1.0))
    ]
    rows += [
        {
            "suite": "kernels",
            "loss": "tv_pixel",
            "variant": v,
            "pass": "fwd",
            "N": 64,
            "image": "mnist",
            "median_s": t,
        }
        for v, t in (("torch", 3.0), ("torch_compiled", 1.5))
    ]
    rows.append({"suite": "evaluate", "pairs": 10, "matrices_s": 2.0})
    model = floors.Floors(None, None, ssim_pair=floors.Cost(100, 10))
    gpu.annotate(rows, {"peaks": floors.Peaks(100.0, 200.0, 10.0), "floors": model})
    assert [r["speedup_vs_naive"] for r in rows[:4]] == [1.0, 4.0, 1.0, 2.0]
    assert rows[4]["matrices_floor_s"] == 10.0 and rows[4]["matrices_pct_of_floor"] == 500.0


def test_matmul_precision_switches_and_restores_torch_state():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with precision.matmul_precision("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
    with precision.matmul_precision("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.is_autocast_enabled("cpu")
    with precision.matmul_precision("fp32", "cpu"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_refused_naming_it():
    with pytest.raises(
        ValueError, match=r"precision must be one of \('fp32', 'tf32', 'bf16'\), got 'fp16'"
    ):
        with precision.matmul_precision("fp16", "cpu"):
            pass


def test_relative_deviation():
    assert precision.relative_deviation([1.0, 2.2], [1.0, 2.0]) == pytest.approx([0.0, 0.1])
