"""The study files as generated documentation: `bench.docs` renders a leakage-study.json."""

from __future__ import annotations

import json

from bench import docs
from tldr_fast import study


def test_a_study_file_renders_the_chosen_fields_with_the_gap_and_its_interval(tmp_path):
    rows = [
        {
            **{key: 0 for key in study.ROW_FIELDS},
            "method": m,
            "gap": g,
            "gap_ci": [g - 0.01, g + 0.02],
        }
        for m, g in (("kkt", 0.1234), ("tldr", -0.0005))
    ]
    (tmp_path / "s.json").write_text(
        json.dumps({"spec": {}, "schema": list(study.ROW_FIELDS), "rows": rows})
    )
    table = docs.render("s.json where=method:kkt columns=method,gap|.2f,gap_95ci", tmp_path)
    assert (
        table
        == "| method | gap | gap_95ci |\n|---|---|---|\n| kkt | 0.12 | +0.123 [+0.113, +0.143] |\n"
    )
    assert docs.render("s.json columns=method", tmp_path).splitlines()[2:] == [
        "| kkt |",
        "| tldr |",
    ]
