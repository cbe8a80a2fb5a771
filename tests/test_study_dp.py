"""The leakage study's DP axis: spec keys, DP-GD training of the KKT target, epsilon in the rows,
resume, and rows written before the axis existed."""

from __future__ import annotations

import json

import pytest
import test_study
import torch
import torch.nn.functional as F

from tldr_fast import serialization, study
from tldr_fast.attacks import dp
from tldr_fast.attacks.kkt import KKTMLP
from tldr_fast.training import build_seeded, train_kkt_recipe

# The runner with every cell faked (test_study's fixture and rows): resume and the study files.
fake_cells = test_study.fake_cells
_fake_row = test_study._fake_row

SPEC = {
    "dataset": "mnist-bundled",
    "train_sizes": [10],
    "archs": ["kkt-mlp"],
    "methods": ["kkt"],
    "seeds": [0],
    "noise_multipliers": [0, 0.5],
}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"noise_multipliers": [-1]}, "noise_multipliers"),
        ({"noise_multipliers": ["1"]}, "noise_multipliers"),
        ({"noise_multipliers": [True]}, "noise_multipliers"),
        ({"noise_multipliers": [float("inf")]}, "noise_multipliers"),
        ({"noise_multipliers": 0.5}, "noise_multipliers"),
        ({"noise_multipliers": []}, "noise_multipliers"),
        ({"archs": ["cnn", "kkt-mlp"]}, "BatchNorm"),
        ({"budgets": {"dp_clip": 0}}, "dp_clip"),
        ({"budgets": {"dp_delta": 1.0}}, "dp_delta"),
        ({"exclude": [{"colour": "red"}]}, "exclude"),
        ({"exclude": {"seed": 0}}, "exclude"),
        ({"exclude": [{"seed": [0, 5]}]}, "seed 5"),
        ({"exclude": [{"method": "dream"}]}, "method 'dream'"),
    ],
)
def test_dp_spec_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=match) as err:
        study.check_spec({**SPEC, **change})
    assert "\n" not in str(err.value)


def test_non_private_spec_keeps_the_old_cell_names():
    spec = study.check_spec({**SPEC, "noise_multipliers": [0]})
    assert [study.cell_name(c) for c in study.cells(spec)] == ["kkt-kkt-mlp-n10-s0"]
    spec = study.check_spec({**SPEC, "noise_multipliers": [0, 0.5, 2]})
    names = [study.cell_name(c) for c in study.cells(spec)]
    assert names == ["kkt-kkt-mlp-n10-s0", "kkt-kkt-mlp-n10-s0-dp0.5", "kkt-kkt-mlp-n10-s0-dp2"]


def test_exclude_leaves_out_matching_cells():
    spec = study.check_spec(
        {
            **SPEC,
            "train_sizes": [10, 20],
            "seeds": [0, 1],
            "methods": ["tldr", "kkt"],
            "exclude": [
                {"method": "tldr", "seed": [1]},
                {"train_size": 20, "noise_multiplier": 0.5},
            ],
        }
    )
    grid = study.cells(spec)
    assert not any(c["method"] == "tldr" and c["seed"] == 1 for c in grid)
    assert not any(c["train_size"] == 20 and c["noise_multiplier"] == 0.5 for c in grid)
    assert len(grid) == 2 * 2 * 2 * 2 - 4 - 3


def _reference_clipped_gd(model, x, y, steps, lr, clip):
    """Plain-torch DP-GD without noise: per-sample gradients clipped to `clip`, averaged, a step."""
    params = list(model.parameters())
    for _ in range(steps):
        total = [torch.zeros_like(p) for p in params]
        for i in range(len(x)):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
            total = [t + scale * g for t, g in zip(total, grads, strict=True)]
        with torch.no_grad():
            for p, t in zip(params, total, strict=True):
                p -= lr * t / len(x)


def test_dp_gd_without_noise_is_clipped_full_batch_gd():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    make = lambda: build_seeded(lambda: KKTMLP(1, 3, 6, hidden=(5,)), seed=3).double()  # noqa: E731
    private = make()
    train_kkt_recipe(
        private, x, y, steps=3, lr=0.5, init_scale=1.0, noise_multiplier=0.0,
        max_grad_norm=0.05, device="cpu", progress=False,
    )  # fmt: skip
    reference = make()
    _reference_clipped_gd(reference, x, y, steps=3, lr=0.5, clip=0.05)
    initial = list(make().parameters())
    for p, q, p0 in zip(private.parameters(), reference.parameters(), initial, strict=True):
        assert torch.isfinite(p).all()
        assert (q - p0).abs().max() > 1e-4  # the steps moved the weights
        err = (p - q).norm() / q.norm()
        assert err < 1e-9, err
    assert private.train_report.privacy["steps"] == 3


def test_resume_skips_finished_dp_cells(tmp_path, fake_cells):
    spec = study.check_spec({**SPEC, "seeds": [0, 1]})
    rows = study.run_study(spec, tmp_path, log=lambda _: None)
    assert len(fake_cells) == 4 and [r["noise_multiplier"] for r in rows] == [0, 0.5, 0, 0.5]
    study.run_study(spec, tmp_path, log=lambda _: None)
    assert len(fake_cells) == 4
    (tmp_path / "cells" / "kkt-kkt-mlp-n10-s1-dp0.5" / "row.json").unlink()
    study.run_study(spec, tmp_path, log=lambda _: None)
    assert fake_cells[4:] == ["kkt-kkt-mlp-n10-s1-dp0.5"]
    text = (tmp_path / "leakage-study.md").read_text()
    assert "| kkt | kkt-mlp | 10 | 0.5 | 0 | 0, 1 |" in text  # the fake rows' epsilon is 0
    assert (tmp_path / "leakage-study-dp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_only_runs_nothing(tmp_path, fake_cells):
    spec = study.check_spec({**SPEC, "seeds": [0, 1]})
    study.run_study(study.check_spec(SPEC), tmp_path, log=lambda _: None)
    rows = study.run_study(spec, tmp_path, log=lambda _: None, finished_only=True)
    assert len(fake_cells) == 2 and [r["seed"] for r in rows] == [0, 0]
    assert len(json.loads((tmp_path / "leakage-study.json").read_text())["rows"]) == 2


def test_rows_written_before_the_dp_axis_load(tmp_path, fake_cells):
    old_fields = [f for f in study.ROW_FIELDS if f not in study.NON_PRIVATE_FIELDS]
    spec = study.check_spec({**SPEC, "noise_multipliers": [0]})
    cell = study.cells(spec)[0]
    old = {k: v for k, v in _fake_row(cell).items() if k in old_fields}
    done = tmp_path / "cells" / study.cell_name(cell) / "row.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps(old))
    rows = study.run_study(spec, tmp_path, log=lambda _: None)
    assert fake_cells == [] and tuple(rows[0]) == study.ROW_FIELDS
    assert rows[0]["noise_multiplier"] == 0 and rows[0]["epsilon"] is None
    old_file = tmp_path / "old.json"
    old_file.write_text(json.dumps({"spec": SPEC, "schema": old_fields, "rows": [old]}))
    loaded = study.read_results(old_file)
    assert loaded["schema"] == list(study.ROW_FIELDS) and loaded["rows"] == rows


def test_a_dp_cell_records_the_accountants_epsilon(tmp_path):
    spec = study.check_spec(
        {
            **SPEC,
            "noise_multipliers": [0.5],
            "budgets": {"kkt_train_steps": 4, "kkt_hidden": [8], "kkt_steps": 2, "dp_delta": 1e-3},
            "bootstrap": 10,
        }
    )
    (row,) = study.run_study(spec, tmp_path, log=lambda _: None)
    expected = dp.rdp_privacy(1.0, 4, 0.5, 1e-3)
    assert row["noise_multiplier"] == 0.5
    assert row["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-12)
    privacy = serialization.load(
        tmp_path / "targets" / "kkt-mlp-n10-s0-dp0.5.safetensors"
    ).metadata["privacy"]
    assert privacy["steps"] == 4 and privacy["sample_rate"] == 1.0 and privacy["delta"] == 1e-3
    assert (tmp_path / "leakage-study-dp.png").is_file()
