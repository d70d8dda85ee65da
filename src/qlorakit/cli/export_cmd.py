"""``qlorakit export``: a merged model or an adapter as GGUF for llama.cpp, Ollama and LM Studio.

    qlorakit export gguf --model SOURCE [--adapter DIR] --output FILE.gguf [--type f16] [--no-quant] [--overwrite]
    qlorakit export gguf-adapter --model SOURCE --adapter DIR --output FILE.gguf [--type f32] [--overwrite]

``gguf`` loads the base as ``merge`` does (4-bit, as in training, unless ``--no-quant``), folds the adapter
in (``W + scale * B A`` in fp32) and writes one GGUF of ``--type``, plus ``FILE.gguf.Modelfile`` for
``ollama create``. ``gguf-adapter`` writes the adapter alone as a llama.cpp LoRA
(``llama-cli -m BASE.gguf --lora FILE.gguf``); with a GGUF base its Modelfile says ``FROM`` that base and
``ADAPTER`` the file. The output, the adapter, the type and the architecture are checked before the model
is loaded. docs/export.md has the types, the architectures and the measured parity with llama.cpp.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from qlorakit.export.gguf_types import ADAPTER_TYPES, OUTPUT_TYPES

    p = subparsers.add_parser("export", help="export a merged model or an adapter as GGUF (llama.cpp, Ollama)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    model = formats.add_parser("gguf", help="the merged model as one GGUF file (+ an Ollama Modelfile)")
    model.add_argument("--adapter", help="adapter directory (PEFT layout); without it the base alone is exported")
    model.add_argument("--type", default="f16", help=f"GGUF type: {', '.join(OUTPUT_TYPES)} (default: f16)")
    model.add_argument("--no-quant", action="store_true",
                       help="merge into the source's own weights (loaded in fp32) instead of the 4-bit base of "
                       "training")
    model.add_argument("--no-modelfile", action="store_true", help="do not write FILE.gguf.Modelfile")
    model.set_defaults(func=run_model)
    adapter = formats.add_parser("gguf-adapter", help="the adapter alone as a llama.cpp LoRA GGUF")
    adapter.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    adapter.add_argument("--type", default="f32", help=f"GGUF type: {', '.join(ADAPTER_TYPES)} (default: f32)")
    adapter.set_defaults(func=run_adapter)
    for sub in (model, adapter):
        sub.add_argument("--model", required=True, help="base model source (as for train)")
        sub.add_argument("--output", required=True, help="output .gguf file")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare(args: argparse.Namespace, allowed: tuple[str, ...]):
    """Every cheap check (output, type, adapter files, architecture) before the model loads; the source."""
    from qlorakit.export.gguf_arch import arch_named
    from qlorakit.export.gguf_file import check_output
    from qlorakit.export.gguf_types import check_output_type
    from qlorakit.lora import check_adapter_dir
    from qlorakit.models import inspect_source, resolve_source

    check_output(Path(args.output), args.overwrite)
    out_type = check_output_type(args.type, allowed)
    if args.adapter:
        check_adapter_dir(args.adapter)
    source = resolve_source(args.model)
    arch_named(inspect_source(source).model_type)
    return source, out_type


def _load(args: argparse.Namespace, source, quantized: bool):
    import torch

    from qlorakit.config import QuantConfig
    from qlorakit.lora import load_adapter
    from qlorakit.models import load_model

    model = load_model(source, quant=QuantConfig() if quantized else None, compute_dtype=torch.float32)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model


def _chat_template(source) -> tuple[str | None, str | None]:
    """(chat template, EOS token text) of the source for the Modelfile; (None, None) without a tokenizer."""
    from qlorakit.errors import ModelLoadError
    from qlorakit.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(source)
    except ModelLoadError:
        return None, None
    return getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None)


def run_model(args: argparse.Namespace) -> int:
    from qlorakit.export import export_gguf, write_modelfile
    from qlorakit.export.gguf_types import OUTPUT_TYPES

    source, out_type = _prepare(args, OUTPUT_TYPES)
    model = _load(args, source, quantized=not args.no_quant)
    report = export_gguf(model, source, args.output, out_type, overwrite=args.overwrite, progress=not args.no_progress)
    if not args.no_quant:
        report.notes.append("the base was loaded in NF4 as in training, so the export holds NF4-rounded base weights "
                            "(the model the adapter was trained on); --no-quant merges into the source's own weights")
    print(report.format())
    if not args.no_modelfile:
        print(f"wrote {write_modelfile(report.path, *_chat_template(source))}")
    return 0


def run_adapter(args: argparse.Namespace) -> int:
    from qlorakit.export import export_gguf_adapter, write_modelfile
    from qlorakit.export.gguf_types import ADAPTER_TYPES
    from qlorakit.models.source import GGUF

    source, out_type = _prepare(args, ADAPTER_TYPES)
    model = _load(args, source, quantized=True)  # the base's weights only serve to check the adapter's shapes
    report = export_gguf_adapter(model, args.output, out_type, overwrite=args.overwrite, progress=not args.no_progress)
    print(report.format())
    if source.kind == GGUF:
        print(f"wrote {write_modelfile(report.path, *_chat_template(source), base_gguf=source.path)}")
    return 0
