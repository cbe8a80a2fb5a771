"""`python -m bench SUITE [--json out.json] [--quick] [--device cpu|cuda]`; SUITE `all` runs every suite,
`gpu` every GPU suite in one budgeted run (`bench.gpu`)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench.common import environment, print_table, write_json

# suite name -> module; each module has run(args) -> list[dict] and optionally add_arguments(parser)
SUITES: dict[str, str] = {
    "evaluate": "bench.evaluate",
    "gradnorm": "bench.grad_norm",
    "distributed": "bench.distributed",
    "kernels": "bench.kernels",
    "step": "bench.step",
}
# Suites that run the others (not part of `all`); a module may define print_rows(rows) for its table.
COMPOSITE_SUITES: dict[str, str] = {"gpu": "bench.gpu"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES) + sorted(COMPOSITE_SUITES) + ["all"])
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI gate)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args, rest = parser.parse_known_args(argv)
    names = sorted(SUITES) if args.suite == "all" else [args.suite]
    modules = {n: importlib.import_module({**SUITES, **COMPOSITE_SUITES}[n]) for n in names}
    for mod in modules.values():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = {
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "suites": {},
    }
    for name, mod in modules.items():
        print(f"\n== {name} ({args.device}) ==")
        rows = mod.run(args)
        payload["suites"][name] = rows
        if hasattr(mod, "print_rows"):
            mod.print_rows(rows)
        else:
            print_table(
                rows,
                list(
                    dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list)))
                ),
            )
    if args.json_path:
        write_json(args.json_path, payload)
        print(f"\nwrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
