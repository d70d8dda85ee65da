"""``qlorakit merge``: fold a LoRA adapter into its base model and write a plain transformers checkpoint.

    qlorakit merge --model SOURCE --adapter DIR --output OUT [--dtype bfloat16] [--quantize nf4] [--overwrite]

The base is loaded in 4-bit (as in training) unless ``--no-quant``, the adapter is checked against it,
and the merged weights are written in ``--dtype``. ``--quantize`` writes the bitsandbytes 4-bit layout
instead and prints the error that re-quantizing the merged weights added.
"""

from __future__ import annotations

import argparse

from qlorakit.constants import BASE_QUANT_TYPES, QUANT_NONE
from qlorakit.errors import ConfigError

DTYPES = ("bfloat16", "float16", "float32")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base and export a HF checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model source (as for train)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the exported weights (default: bfloat16)")
    p.add_argument("--quantize", choices=("nf4", "fp4"),
                   help="write a bitsandbytes 4-bit checkpoint and report the added error")
    p.add_argument("--quant-type", choices=BASE_QUANT_TYPES, default="nf4",
                   help="how the base is loaded, as in training (default: %(default)s; none = 16/32-bit)")
    p.add_argument("--no-quant", action="store_true", help="load the base in 16/32 bit (= --quant-type none)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qlorakit.config import QuantConfig
    from qlorakit.lora import check_adapter_dir, load_adapter
    from qlorakit.models import load_model, load_tokenizer
    from qlorakit.models.export import check_output_dir, merge_and_export

    out = check_output_dir(args.output, inputs=[args.model, args.adapter])
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")
    refuse_whole_model(args.adapter)
    check_adapter_dir(args.adapter)  # before the minutes of loading the base
    quant = QuantConfig(quant_type=QUANT_NONE if args.no_quant else args.quant_type)
    model = load_model(args.model, quant=quant, lora=None, compute_dtype=torch.float32)
    load_adapter(model, args.adapter)
    quantize = QuantConfig(quant_type=args.quantize) if args.quantize else None
    report = merge_and_export(model, out, dtype=getattr(torch, args.dtype), tokenizer=load_tokenizer(args.model),
                              quantize=quantize, overwrite=args.overwrite)
    print(report.format())
    return 0


def refuse_whole_model(adapter: str) -> None:
    """A whole model directory (a ``--finetune full`` run's ``model/``) given as the adapter: nothing to merge."""
    from pathlib import Path

    path = Path(adapter)
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {path} is a whole model (config.json, no adapter_config.json), e.g. the model/ "
                          "of a --finetune full run: it has no adapter to merge; use it as --model directly "
                          "(qlorakit generate --model DIR, export gguf --model DIR)")
