"""``qlorakit chat``: an interactive conversation with a 4-bit base model and its adapters.

    qlorakit chat --model SOURCE [--adapter [NAME=]DIR ...] [--use NAME] [--max-new-tokens N]
                  [--temperature T --top-p P --seed S]

Reads one user message per line from stdin (so it can be piped), renders the conversation with the
tokenizer's chat template and streams each reply to stdout. Commands: ``/adapter NAME`` (``base``: no
adapter), ``/reset`` (clear the history), ``/quit``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qlorakit.cli.generate_cmd import (
    add_model_args,
    load_for_generation,
    parse_adapters,
    sampling_from_args,
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="chat with a 4-bit base (+ adapters) over stdin/stdout",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qlorakit.generate import ChatSession

    sampling = sampling_from_args(args)
    specs, default = parse_adapters(args, [])
    model, tokenizer = load_for_generation(args, specs)
    session = ChatSession(model, tokenizer, sampling, args.max_new_tokens, adapter=default)
    interactive = sys.stdin.isatty()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if interactive:
        write(f"[adapter: {default or 'base'}; commands: /adapter NAME, /reset, /quit]\n> ")
    for line in sys.stdin:
        if not session.handle_line(line, write):
            break
        if interactive:
            write("> ")
    return 0
