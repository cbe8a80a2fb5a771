"""The `tldr-fast` command line: one module per group of subcommands, each with `register(commands, attacks)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module adds its subcommands to `commands` (top level) or `attacks` (`tldr-fast attack ...`).
COMMAND_MODULES = [
    "tldr_fast.cli.train",
    "tldr_fast.cli.engine",
    "tldr_fast.cli.evaluate",
    "tldr_fast.cli.attack_split",
    "tldr_fast.cli.attack_dfm",
    "tldr_fast.cli.attack_bnn",
    "tldr_fast.cli.attack_kkt",
    "tldr_fast.cli.study",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tldr-fast",
        description="Reconstruct training-like images from a trained image classifier, and measure the leak.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('tldr_fast').__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    attack = commands.add_parser("attack", help="related attacks: split-model inversion, Data-from-Model, BNN by SAT")
    attacks = attack.add_subparsers(dest="attack", metavar="ATTACK", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, attacks)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback.
        print(f"tldr-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already written are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
