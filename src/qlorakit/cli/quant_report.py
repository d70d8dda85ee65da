"""``qlorakit quant-report``: quantization error and throughput of the 4-bit formats.

Prints a table of NF4 / FP4 / INT4 reconstruction error, with and without double quantization, and the
(de)quantize throughput next to bitsandbytes when it is installed; writes the numbers as JSON. The work
is done by ``qlorakit.quant.report``, imported only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``quant-report`` on ``subparsers`` (the object ``add_subparsers`` returned)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "quant-report",
        help="measure NF4/FP4/INT4 quantization error and (de)quantize throughput",
        description=(
            "Measure the reconstruction error of NF4, FP4 and INT4 (with and without double"
            " quantization) and the (de)quantize throughput, next to bitsandbytes when installed."
        ),
    )
    parser.add_argument(
        "--output", metavar="FILE.json", default="quant_report.json",
        help="where to write the JSON results (default: %(default)s)",
    )
    parser.add_argument(
        "--numel", metavar="N", type=int, default=4_194_304,
        help="number of elements in the synthetic test tensor (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", metavar="R", type=int, default=5,
        help="timing repeats; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--gguf", metavar="PATH", default=None,
        help="also measure the weights of this GGUF model (optional)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the report with the parsed ``args``; returns the exit code."""
    from qlorakit.quant import report

    return int(report.main_from_args(args) or 0)
