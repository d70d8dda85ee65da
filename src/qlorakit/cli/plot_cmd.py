"""``qlorakit plot RUN_DIR``: redraw a run's ``loss.png`` from its ``metrics.jsonl``."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorakit.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="redraw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qlorakit.train.metrics import METRICS_FILE, plot_run

    metrics = Path(args.run_dir) / METRICS_FILE
    if not metrics.is_file():
        raise ConfigError(f"{metrics} does not exist; RUN_DIR must be a qlorakit run directory")
    print(plot_run(args.run_dir))
    return 0
