"""`tldr-fast study SPEC`: run a declared leakage study, resumably, and write its table and plot."""

from __future__ import annotations

import argparse


def register(commands, attacks) -> None:
    del attacks  # a top-level command
    p = commands.add_parser(
        "study",
        help="run a leakage study (train sizes x architectures x methods x seeds) from a JSON/TOML spec",
        description=(
            "Train each target once, run every method against it, score each cell with `evaluate` and "
            "write leakage-study.json, leakage-study.md and leakage-study.png. One run directory per "
            "cell; cells finished earlier are skipped, so an interrupted study resumes where it stopped. "
            "See tldr_fast/study.py for the spec's keys."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", help="study spec (.json or .toml)")
    p.add_argument("--out", default="runs/leakage-study", help="run root: targets/ and cells/")
    p.add_argument("--results", default=None, help="directory for the study files (default: --out)")
    from tldr_fast.cli.train import add_data_root_argument

    add_data_root_argument(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: write the study files from the cells finished so far",
    )
    p.set_defaults(func=run, writes={"--out": "dir", "--results": "dir"})


def run(args) -> int:
    from pathlib import Path

    from tldr_fast.study import read_spec, run_study

    spec = read_spec(args.spec)
    rows = run_study(
        spec,
        args.out,
        args.results,
        data_root=args.data_root,
        device=args.device,
        progress=args.progress,
        finished_only=args.finished_only,
    )
    results = Path(args.results or args.out)
    print(
        f"{len(rows)} cells; wrote {results / 'leakage-study.json'}, leakage-study.md and the plots"
    )
    return 0
