"""The CI gate: fails with a message naming the ratio, the measured value and the threshold."""

from __future__ import annotations

import json

from bench import gate


def measured(**ratios):
    return {name: {"fast_s": 1.0, "naive_s": r, "ratio": r} for name, r in ratios.items()}


BASELINE = {"tolerance": 0.25, "ratios": {"a": {"threshold": 4.0}, "b": {"threshold": 2.0}}}


def test_passes_within_tolerance():
    assert gate.check(measured(a=3.0, b=2.5), BASELINE) == []


def test_fails_more_than_tolerance_below_threshold():
    failures = gate.check(measured(a=2.9, b=2.0), BASELINE)
    assert failures == [
        "a: measured speedup 2.90x is more than 25% below the threshold 4.00x (floor 3.00x)"
    ]


def test_a_ratio_missing_from_the_measurements_fails():
    assert gate.check(measured(a=4.0), BASELINE) == ["b: in baseline.json but not measured"]


def test_committed_baseline_names_the_measured_ratios():
    baseline = json.loads(gate.BASELINE.read_text())
    assert 0 < baseline["tolerance"] < 1
    assert set(baseline["ratios"]) == {
        "step_fast_eager_vs_naive",
        "grad_norm_ghost_vs_vmap",
        "diversity_identity_vs_gram",
    }


def test_main_exits_1_on_regression(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gate, "measure_ratios", lambda repeats: measured(a=1.0, b=2.0))
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(BASELINE))
    assert gate.main(["--baseline", str(path)]) == 1
    assert "REGRESSION a: measured speedup 1.00x" in capsys.readouterr().err
    monkeypatch.setattr(gate, "measure_ratios", lambda repeats: measured(a=4.0, b=2.0))
    assert gate.main(["--baseline", str(path)]) == 0


def test_paired_ratio_times_both_in_every_round_alternating_the_order():
    from bench.common import paired_ratio

    calls = []
    ratio, timing, reference = paired_ratio(
        lambda: calls.append("fn"), lambda: calls.append("ref"), warmup=1, repeats=4
    )
    assert calls == ["ref", "fn"] + ["ref", "fn", "fn", "ref"] * 2
    assert timing.repeats == reference.repeats == 4
    assert ratio > 0


def test_interleaved_times_rotate_the_order_every_round():
    from bench.common import interleaved_times

    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    times = interleaved_times(fns, warmup=1, repeats=4)
    assert calls == list("abc") + list("abcbcacababc")
    assert [len(t) for t in times] == [4, 4, 4]


def test_step_bench_times_variants_in_the_same_rounds_on_cpu():
    from bench.step import bench_classifier, measure_interleaved

    rows = measure_interleaved(
        ["naive", "fast-eager"], 4, bench_classifier("cpu"), "cpu", quick=True
    )
    assert [r["variant"] for r in rows] == ["naive", "fast-eager"]
    assert all(r["status"] == "ok" and r["repeats"] == 3 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_vs_naive"] == 1.0 and rows[1]["speedup_vs_naive"] > 0
