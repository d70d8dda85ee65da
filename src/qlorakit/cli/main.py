"""The ``qlorakit`` command: global options, the subcommand table, and error reporting.

To add a subcommand, write ``qlorakit/cli/<name>.py`` with ``add_parser(subparsers) -> None`` (it calls
``subparsers.add_parser(...)`` and sets ``func`` to a handler ``(argparse.Namespace) -> int``) and list
the module in ``SUBCOMMANDS``. Handlers import the heavy library modules lazily, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from qlorakit import __version__
from qlorakit.cli import (
    chat_cmd,
    data_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    inspect_cmd,
    merge_cmd,
    plan_cmd,
    plot_cmd,
    quant_report,
    serve_cmd,
    train_cmd,
)
from qlorakit.errors import QlorakitError

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[ModuleType, ...] = (
    train_cmd, merge_cmd, export_cmd, inspect_cmd, plot_cmd, quant_report, eval_cmd, generate_cmd, chat_cmd, serve_cmd,
    plan_cmd, data_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand in ``SUBCOMMANDS`` registered."""
    parser = argparse.ArgumentParser(
        prog="qlorakit",
        description="QLoRA fine-tuning on small hardware: 4-bit base models with LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"qlorakit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the chosen subcommand and return its exit code.

    A ``QlorakitError`` is printed as ``error: <message>`` on stderr and gives exit code 2, without a
    traceback. Argument errors exit through argparse (``SystemExit`` with code 2).
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except QlorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
