"""`python -m bench.docs [--check]`: regenerate every measured table in README.md and docs/ from JSON.

A table in a Markdown file is written between two markers:

    <!-- table: PATH [suite=NAME] [where=FIELD:VALUE,...] [columns=FIELD|FORMAT,...] -->
    | ... generated ... |
    <!-- /table -->

PATH (relative to the repository root) is either a *table file*, `{"source": str, "columns": [str],
"rows": [[cell]], "decimals": {column: int}}`, whose cells are strings or numbers (a number in a
column listed in `decimals` is printed with that many decimals), or a *benchmark file* written by
`python -m bench` (`{"suites": {name: [row]}}`, or `{"runs": [[row]]}` for repeated runs, whose rows
gain a `run` field numbered from 1), or a *study file* written by `tldr-fast study` (`{"spec",
"schema", "rows"}`, whose rows gain `gap_95ci`, the gap and its interval as one text). For a
benchmark or study file `columns` picks the row fields to show,
each with an optional format spec (`median_s|.2f`); `where` keeps the rows whose fields equal the
given values. Nothing between the markers is kept: the JSON is the only source of the numbers, and
`--check` (run by the tests) fails when a file is not what its JSON renders to.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tldr_fast.study import gap_with_interval

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- table: (?P<spec>[^>]*?) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/, the files whose tables are generated."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _cell(value, fmt: str | None) -> str:
    if value is None:
        return ""
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    path, *options = spec.split()
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in {"suite", "where", "columns"}:
            raise ValueError(f"table option {option!r}: expected suite=, where= or columns=")
        parsed[key] = value
    return path, parsed


def _study_rows(data: dict) -> list[dict]:
    return [{**r, "gap_95ci": gap_with_interval(r)} for r in data["rows"]]


def _benchmark_rows(data: dict, suite: str | None) -> list[dict]:
    if "schema" in data and "rows" in data:
        return _study_rows(data)
    if "runs" in data:
        return [{"run": i + 1, **row} for i, run in enumerate(data["runs"]) for row in run]
    suites = data.get("suites", {})
    if suite is None:
        if len(suites) != 1:
            raise ValueError(f"benchmark file holds suites {sorted(suites)}: name one with suite=")
        (suite,) = suites
    if suite not in suites:
        raise ValueError(f"suite={suite!r}: the file holds {sorted(suites)}")
    return suites[suite]


def render(spec: str, root: Path = ROOT) -> str:
    """The Markdown table that the marker `<!-- table: spec -->` stands for."""
    path, options = _parse_spec(spec)
    data = json.loads((root / path).read_text())
    if "columns" in data and "rows" in data:
        decimals = data.get("decimals", {})
        fmts = [f".{decimals[c]}f" if c in decimals else None for c in data["columns"]]
        return _markdown(
            data["columns"], [[_cell(v, f) for v, f in zip(row, fmts)] for row in data["rows"]]
        )
    rows = _benchmark_rows(data, options.get("suite"))
    for condition in filter(None, options.get("where", "").split(",")):
        field, _, value = condition.partition(":")
        rows = [r for r in rows if str(r.get(field)) == value]
    if "columns" not in options:
        raise ValueError(f"table {path}: a benchmark or study file needs columns=")
    fields = [c.partition("|") for c in options["columns"].split(",")]
    return _markdown(
        [f for f, _, _ in fields],
        [[_cell(r.get(f), fmt or None) for f, _, fmt in fields] for r in rows],
    )


def regenerate(text: str, root: Path = ROOT) -> str:
    """`text` with every marked table rendered afresh from its JSON."""
    return MARKER.sub(
        lambda m: f"<!-- table: {m['spec']} -->\n{render(m['spec'], root)}<!-- /table -->", text
    )


def demo_table(metrics: dict, command: str = "tldr-fast demo") -> dict:
    """The README's table of a scored run (a `metrics.json` written by `tldr-fast evaluate`) as a table file."""
    gap = metrics["leakage_gap"]
    lo, hi = gap["mean_best_ssim"]["ci"]
    fidelity = metrics["fidelity"]
    rows = [
        [
            "reconstructed (authors' protocol), train / held-out",
            f"{gap['percent_reconstructed']['train']:.1f}% / {gap['percent_reconstructed']['heldout']:.1f}%",
        ],
        [
            "mean best-match SSIM, train / held-out",
            f"{gap['mean_best_ssim']['train']:.3f} / {gap['mean_best_ssim']['heldout']:.3f}",
        ],
        [
            f"leakage gap [{100 * gap['confidence']:.0f}% interval]",
            f"{gap['mean_best_ssim']['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]",
        ],
        ["independent evaluator's accuracy", f"{100 * fidelity['evaluator_accuracy']:.1f}%"],
        [
            "target's mean confidence in the intended label",
            f"{fidelity['target_mean_confidence']:.3f}",
        ],
    ]
    return {"source": command, "columns": ["statistic", "value"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.docs", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="report stale files and exit 1 instead of writing"
    )
    parser.add_argument(
        "--demo-metrics",
        metavar="METRICS_JSON",
        help="first write docs/results/demo.json from this run's metrics.json (tldr-fast demo)",
    )
    args = parser.parse_args(argv)
    if args.demo_metrics:
        table = demo_table(json.loads(Path(args.demo_metrics).read_text()))
        (ROOT / "docs" / "results" / "demo.json").write_text(json.dumps(table, indent=1) + "\n")
    stale = []
    for path in documents():
        text = path.read_text()
        fresh = regenerate(text)
        if fresh != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(fresh)
    for path in stale:
        print(f"{'stale' if args.check else 'regenerated'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
