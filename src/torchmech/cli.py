"""The `torchmech` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import torchmech

# Subcommands register here: name -> (help text, add_arguments(parser), run(args) -> exit code).
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register(name: str, help: str, add_arguments, run) -> None:
    """Register a subcommand of `torchmech` (used by the modules that provide them)."""
    _COMMANDS[name] = (help, add_arguments, run)


def _builtin_commands() -> None:
    from torchmech.discovery import command as discover

    register("discover", "Discover governing equations from trajectories (default: Lorenz with 1% noise)",
             discover.add_arguments, discover.run)


def build_parser() -> argparse.ArgumentParser:
    _builtin_commands()
    parser = argparse.ArgumentParser(
        prog="torchmech",
        description="Learn differential equations from data: Mechanistic Neural Networks, "
        "neural differential equations and equation discovery.",
    )
    parser.add_argument("--version", action="version", version=f"torchmech {torchmech.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in sorted(_COMMANDS.items()):
        # argparse %-formats help strings (not descriptions): a literal "1%" must be escaped there.
        add_arguments(sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _COMMANDS[args.command][2](args)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
