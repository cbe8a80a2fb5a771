"""The leakage-study runner: spec checks, resume, the row schema and the study files."""

from __future__ import annotations

import json

import pytest
import torch

from tldr_fast import study
from tldr_fast.cli import main
from tldr_fast.evaluate import reconstruction_scores

SPEC = {
    "dataset": "mnist-bundled",
    "train_sizes": [10, 20],
    "archs": ["kkt-mlp"],
    "methods": ["tldr", "kkt"],
    "seeds": [0],
}


def _fake_row(cell: dict) -> dict:
    row = {key: 0.0 for key in study.ROW_FIELDS}
    row.update(
        cell,
        gap=0.01 * cell["train_size"],
        gap_ci=[0.0, 0.02 * cell["train_size"]],
        nn_count_train=1,
        nn_count_heldout=0,
        evaluator_accuracy=None,
        num_reconstructions=2 * cell["train_size"],
    )
    return row


@pytest.fixture
def fake_cells(monkeypatch):
    calls = []

    def run_cell(spec, cell, root, data_root=None, device=None, progress=False):
        calls.append(study.cell_name(cell))
        return _fake_row(cell)

    monkeypatch.setattr(study, "run_cell", run_cell)
    return calls


def test_resume_skips_finished_cells(tmp_path, fake_cells):
    spec = study.check_spec(SPEC)
    rows = study.run_study(spec, tmp_path, log=lambda _: None)
    assert len(fake_cells) == 4 and len(rows) == 4
    study.run_study(spec, tmp_path, log=lambda _: None)
    assert len(fake_cells) == 4  # nothing ran again
    (tmp_path / "cells" / "kkt-kkt-mlp-n20-s0" / "row.json").unlink()
    rows = study.run_study(spec, tmp_path, log=lambda _: None)
    assert fake_cells[4:] == ["kkt-kkt-mlp-n20-s0"]
    assert [r["train_size"] for r in rows] == [10, 10, 20, 20]


def test_study_files_have_a_stable_schema(tmp_path, fake_cells):
    spec = study.check_spec(SPEC)
    study.run_study(spec, tmp_path, results=tmp_path / "results", log=lambda _: None)
    payload = json.loads((tmp_path / "results" / "leakage-study.json").read_text())
    assert payload["schema"] == list(study.ROW_FIELDS)
    assert payload["spec"] == spec
    assert all(
        sorted(row) == sorted(study.ROW_FIELDS) for row in payload["rows"]
    )  # the file sorts keys
    table = (tmp_path / "results" / "leakage-study.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| tldr | kkt-mlp | 10 | 0 |")
    assert (tmp_path / "results" / "leakage-study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_row_from_real_metrics_has_the_schema_fields():
    gen = torch.Generator().manual_seed(0)
    images = lambda n: torch.rand(n, 1, 8, 8, generator=gen)  # noqa: E731
    labels = torch.arange(6) % 2
    metrics = reconstruction_scores(
        images(6), labels, images(6), labels, images(6), labels, num_bootstrap=20
    )
    metrics["fidelity"]["evaluator_accuracy"] = 0.5
    cell = {"method": "kkt", "arch": "kkt-mlp", "train_size": 6, "seed": 0}
    row = study.study_row(cell, metrics, test_accuracy=0.9, seconds=1.5)
    assert tuple(row) == study.ROW_FIELDS
    gap = metrics["leakage_gap"]["mean_best_ssim"]
    assert row["gap"] == gap["difference"] and row["gap_ci"] == gap["ci"]
    assert row["gap_ci"][0] <= row["gap"] <= row["gap_ci"][1]
    assert row["nn_count_train"] == metrics["nearest_neighbour"]["count_above"]
    assert row["num_reconstructions"] == 6 and row["test_accuracy"] == 0.9


def test_cells_cover_the_grid_in_target_order():
    spec = study.check_spec({**SPEC, "seeds": [0, 1]})
    grid = study.cells(spec)
    assert len(grid) == 2 * 2 * 1 * 2
    assert [study.target_name(c) for c in grid[:2]] == ["kkt-mlp-n10-s0"] * 2


def test_grid_leaves_out_the_prior_on_targets_without_batchnorm():
    spec = study.check_spec(
        {**SPEC, "archs": ["mlp", "kkt-mlp"], "methods": ["tldr+prior", "kkt"], "seeds": [0]}
    )
    pairs = {(c["method"], c["arch"]) for c in study.cells(spec)}
    assert pairs == {("tldr+prior", "mlp"), ("kkt", "mlp"), ("kkt", "kkt-mlp")}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"methods": ["tldr", "dream"]}, "methods"),
        ({"train_sizes": [0]}, "train_sizes"),
        ({"seeds": []}, "seeds"),
        ({"archs": "mlp"}, "archs"),
        ({"budgets": {"tldr_step": 3}}, "budgets"),
        ({"bootstrap": 0}, "bootstrap"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_spec_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        study.check_spec({**SPEC, **change})


def test_toml_spec_and_default_budgets(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(
        'dataset = "mnist"\ntrain_sizes = [100]\narchs = ["mlp"]\nmethods = ["kkt"]\nseeds = [0]\n'
        "[budgets]\nkkt_steps = 7\n"
    )
    spec = study.read_spec(path)
    assert spec["budgets"]["kkt_steps"] == 7
    assert spec["budgets"]["tldr_steps"] == study.DEFAULT_BUDGETS["tldr_steps"]


def test_cli_bad_spec_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**SPEC, "methods": ["dream"]}))
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "methods" in err and "dream" in err
    assert main(["study", str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize(
    ("method", "weights"),
    [
        ("tldr", {"eta_bn": 0.0, "eta_kkt": 0.0}),
        ("tldr+prior", {"eta_bn": study.PRIOR_ETA_BN, "eta_kkt": 0.0}),
        ("tldr+kkt", {"eta_bn": 0.0, "eta_kkt": study.KKT_TERM_ETA, "kkt_train_size": 30}),
    ],
)
def test_each_generator_method_runs_the_paper_objective_with_its_own_extra_term(
    monkeypatch, tmp_path, method, weights
):
    from tldr_fast import api

    seen = {}
    monkeypatch.setattr(api, "reconstruct", lambda *args, **kwargs: seen.update(config=args[3]))
    spec = study.check_spec({**SPEC, "methods": [method]})
    cell = {"method": method, "arch": "kkt-mlp", "train_size": 30, "seed": 0}
    target = torch.nn.Linear(1, 1)
    target.num_classes, target.input_shape = 10, (1, 28, 28)
    study.attack_cell(spec, cell, target, tmp_path / "t.safetensors", tmp_path / "run")
    config = seen["config"]
    assert config.steps == spec["budgets"]["tldr_steps"] and config.seed == 0
    for field, value in weights.items():
        assert getattr(config, field) == value, field
