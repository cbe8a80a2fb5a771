"""The `tldr-fast` command line: one module per group of subcommands, each with `register(commands, attacks)`.

A subcommand that writes declares its outputs with `set_defaults(writes={LABEL: KIND})`, LABEL being
the option (`--out`) or positional (`RUN_DIR`) and KIND one of OUTPUT_KINDS; `main` checks them
all before the command does any work. Every failure ends in one line on stderr: expected ones
(bad arguments, files, directories) as `tldr-fast COMMAND: error: ...` with exit status 2,
anything else as a one-line summary with exit status 1; `--debug` or TLDR_FAST_DEBUG=1 adds the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

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
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.import_module('tldr_fast').__version__}",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of any error (also: TLDR_FAST_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    attack = commands.add_parser(
        "attack",
        help="related attacks: KKT reconstruction, split-model inversion, Data-from-Model, BNN by SAT",
    )
    attacks = attack.add_subparsers(dest="attack", metavar="ATTACK", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, attacks)
    for sub in _subcommands(parser):
        sub.formatter_class = DefaultsHelpFormatter
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (None, False) or says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or action.nargs == 0
            and default is True
        ):
            return text
        if isinstance(default, (list, tuple)) and not default:
            return text
        return f"{text} (default: %(default)s)"


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subcommands(sub)


# "file": a file to write (its directory is made); "dir": a directory to write into (made);
# "run": an existing run directory to update.
OUTPUT_KINDS = ("file", "dir", "run")


def check_outputs(args) -> None:
    """Every output the command declared is writable and of the right kind (ValueError otherwise)."""
    from tldr_fast.atomic_files import check_output_dir, check_output_file

    for label, kind in getattr(args, "writes", {}).items():
        value = getattr(args, label.lstrip("-").replace("-", "_").lower())
        if value is None:
            continue
        if kind == "file":
            check_output_file(value, label)
        elif kind == "run" and not os.path.isdir(value):
            raise FileNotFoundError(f"{label} {value} is not a directory")
        else:
            check_output_dir(value, label)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("TLDR_FAST_DEBUG", "0") not in ("", "0")
    prog = " ".join(
        ["tldr-fast", args.command, *([args.attack] if getattr(args, "attack", None) else [])]
    )
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(
            f"{prog}: warning: {message}", file=sys.stderr
        )
        try:
            check_outputs(args)
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print("interrupted; files already written are complete", file=sys.stderr)
            return 130
        except Exception as err:
            status = _exit_status(err)
            if status is None:
                _report(
                    prog,
                    f"unexpected error: {type(err).__name__}: {_first_line(err)} (rerun with --debug or "
                    "TLDR_FAST_DEBUG=1 for the traceback)",
                    debug,
                )
                return 1
            _report(prog, f"error: {err}", debug)
            return status


def _exit_status(err: Exception) -> int | None:
    """2 for bad input (arguments, files, directories), 1 for a run that failed as documented, None otherwise."""
    from tldr_fast.engine import NonFiniteLossError
    from tldr_fast.run_dir import RunDirectoryError

    if isinstance(err, (ValueError, TypeError, OSError, RunDirectoryError)):
        return 2
    return 1 if isinstance(err, NonFiniteLossError) else None


def _report(prog: str, line: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"{prog}: {line}", file=sys.stderr)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
