"""The documentation's measured tables are generated from committed JSON and never go stale."""

from __future__ import annotations

import json
import re

import pytest

from bench import docs

ROOT = docs.ROOT


def test_every_generated_table_matches_its_json():
    stale = [
        p.relative_to(ROOT)
        for p in docs.documents()
        if docs.regenerate(p.read_text()) != p.read_text()
    ]
    assert not stale, f"stale tables (run `python -m bench.docs`): {stale}"


def test_every_table_marker_names_an_existing_json_file():
    for path in docs.documents():
        for match in docs.MARKER.finditer(path.read_text()):
            target = ROOT / match["spec"].split()[0]
            assert target.is_file(), (
                f"{path.relative_to(ROOT)}: {target.relative_to(ROOT)} is missing"
            )


def test_a_table_file_renders_with_its_decimals(tmp_path):
    (tmp_path / "t.json").write_text(
        json.dumps(
            {
                "source": "s",
                "columns": ["name", "x"],
                "rows": [["a", 0.5], ["b|c", None]],
                "decimals": {"x": 3},
            }
        )
    )
    assert (
        docs.render("t.json", tmp_path) == "| name | x |\n|---|---|\n| a | 0.500 |\n| b\\|c |  |\n"
    )


def test_a_benchmark_file_renders_the_chosen_fields_of_the_chosen_rows(tmp_path):
    rows = [
        {"variant": "naive", "batch": 4, "median_s": 1.23456},
        {"variant": "fast", "batch": 4, "median_s": 0.5},
    ]
    (tmp_path / "b.json").write_text(json.dumps({"suites": {"step": rows}}))
    table = docs.render("b.json where=variant:fast columns=variant,median_s|.2f", tmp_path)
    assert table == "| variant | median_s |\n|---|---|\n| fast | 0.50 |\n"
    (tmp_path / "r.json").write_text(json.dumps({"runs": [rows[:1], rows[1:]]}))
    assert docs.render("r.json columns=run,variant", tmp_path).splitlines()[2:] == [
        "| 1 | naive |",
        "| 2 | fast |",
    ]


def test_regenerate_replaces_only_what_lies_between_the_markers(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"columns": ["a"], "rows": [[1]]}))
    text = "before\n<!-- table: t.json -->\n| stale |\n<!-- /table -->\nafter\n"
    assert (
        docs.regenerate(text, tmp_path)
        == "before\n<!-- table: t.json -->\n| a |\n|---|\n| 1 |\n<!-- /table -->\nafter\n"
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("b.json", "columns="),
        ("b.json suite=nope columns=a", "suite='nope'"),
        ("b.json colour=red", "colour=red"),
    ],
)
def test_bad_markers_name_what_is_wrong(tmp_path, spec, message):
    (tmp_path / "b.json").write_text(json.dumps({"suites": {"step": []}}))
    with pytest.raises(ValueError, match=re.escape(message)):
        docs.render(spec, tmp_path)


# Words that belong in a lab notebook, not in a user's guide or in code documentation.
NOTEBOOK = re.compile(
    r"\bthis session\b|\bsession's\b|\bthe brief\b|\bthe issue'?s?\b|\.\./shared/(DESIGN|papers)"
    r"|(?-i:DESIGN\.md)|\bpaper 00\d\b|\bissue \d+",
    re.I,
)


def test_docs_and_docstrings_read_as_documentation_not_as_a_diary():
    files = [
        *docs.documents(),
        *(ROOT / "tldr_fast").rglob("*.py"),
        *(ROOT / "kernels").rglob("*.py"),
        *(ROOT / "bench").glob("*.py"),
        *(ROOT / "tests").glob("*.py"),
    ]
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if NOTEBOOK.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_demo_table_reads_a_metrics_file():
    metrics = {
        "leakage_gap": {
            "confidence": 0.95,
            "mean_best_ssim": {
                "train": 0.41,
                "heldout": 0.4,
                "difference": 0.0079,
                "ci": [-0.0003, 0.0161],
            },
            "percent_reconstructed": {"train": 70.7, "heldout": 70.0, "difference": 0.7},
        },
        "fidelity": {"evaluator_accuracy": 0.927, "target_mean_confidence": 0.975},
    }
    table = docs.demo_table(metrics)
    assert table["columns"] == ["statistic", "value"]
    assert ["leakage gap [95% interval]", "+0.0079 [-0.0003, +0.0161]"] in table["rows"]
    assert ["independent evaluator's accuracy", "92.7%"] in table["rows"]
