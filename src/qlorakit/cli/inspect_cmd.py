"""``qlorakit inspect SOURCE``: what a model is and what it costs in 4 bits, from its config alone.

Prints the architecture, layer count, parameter counts (total, in the quantized targets, embeddings /
head, norms), the modules that would be quantized and the 4-bit size next to the 16-bit size. No
weights are read (a GGUF's metadata is); the work is done by ``qlorakit.models.inspect``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``inspect`` on ``subparsers`` (the object ``add_subparsers`` returned)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="describe a model (layers, parameters, 4-bit size) without loading its weights",
        description=(
            "Describe a model from its config: architecture, layers, parameter counts, the linear layers"
            " that would be quantized and the 4-bit vs 16-bit size. SOURCE is a local Hugging Face"
            " directory, a .gguf file, an alias such as smollm2-135m-instruct, or a Hub id."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="model directory, .gguf file, alias or Hub id")
    parser.add_argument(
        "--quant-type", default="nf4", choices=("nf4", "fp4", "int4"), help="4-bit type (default: %(default)s)"
    )
    parser.add_argument("--blocksize", type=int, default=64, help="quantization block size (default: %(default)s)")
    parser.add_argument("--no-double-quant", action="store_true", help="size without double quantization")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own config/modeling code")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary of ``args.source``; returns the exit code."""
    from qlorakit.config import QuantConfig
    from qlorakit.models.inspect import format_summary, inspect_source

    quant = QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    summary = inspect_source(args.source, quant=quant, trust_remote_code=args.trust_remote_code)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else format_summary(summary))
    return 0
