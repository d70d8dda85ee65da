"""``qlorakit eval ppl`` and ``qlorakit eval mmlu``: evaluations that run a language model.

    qlorakit eval ppl  --data FILE --output FILE.json [--model M] [--adapter DIR] [--max-seq-len 1024]
                       [--stride N] [--batch-size 1] [--max-tokens N] [--no-quantize | --quant-type nf4]
    qlorakit eval mmlu --data DIR --output FILE.json [--model M] [--adapter DIR] [--shots 5] [--limit N]
                       [--subjects S ...] [--max-seq-len 2048] [--batch-size 8] [--no-quantize | --quant-type nf4]

The model loads like the trainer's (4-bit NF4 with double quantization, fp32 compute) unless
``--no-quantize``; ``--adapter`` adds a PEFT adapter on top. Every input (data, window, adapter directory)
is checked before the model is loaded; the result is printed as a table and written atomically as JSON.
"""

from __future__ import annotations

import argparse
from typing import Any

from qlorakit.cli.arg_types import non_negative_int, positive_int
from qlorakit.config import DEFAULT_MODEL
from qlorakit.constants import QUANT_TYPES


def _add_model_flags(parser: argparse.ArgumentParser, max_seq_len: int, batch_size: int) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="what load_model accepts: a built-in alias, a model directory or a .gguf file "
                             "(default: %(default)s)")
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT adapter directory to apply (e.g. a run's adapter)")
    parser.add_argument("--no-quantize", action="store_true", help="keep the linears in fp32 instead of 4 bits")
    parser.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit type (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=positive_int, default=max_seq_len,
                        help="tokens per model input (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="sequences per forward (default: %(default)s)")
    parser.add_argument("--output", required=True, metavar="FILE.json", help="where to write the JSON result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from qlorakit.config import QuantConfig
    from qlorakit.eval.model_io import load_for_eval

    quant = None if args.no_quantize else QuantConfig(quant_type=args.quant_type)
    return load_for_eval(args.model, quant, args.adapter)


def _describe(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "adapter": args.adapter,
            "quantization": "none (fp32)" if args.no_quantize else f"{args.quant_type}, double quant, block 64"}


def add_ppl(evaluations: Any) -> None:
    """Register ``eval ppl``: sliding-window perplexity of a text file."""
    parser: argparse.ArgumentParser = evaluations.add_parser(
        "ppl", help="perplexity of a text file (.txt, or .jsonl with a 'text' field) with a sliding window",
        description="Windows of --max-seq-len tokens every --stride tokens; each window scores only the tokens"
                    " no earlier window scored (stride = max-seq-len: disjoint windows). Reports exp(mean NLL)"
                    " and the number of scored tokens.")
    parser.add_argument("--data", required=True, metavar="FILE", help="a UTF-8 text file, or .jsonl with 'text'")
    parser.add_argument("--stride", type=positive_int, help="tokens between window starts (default: --max-seq-len)")
    parser.add_argument("--max-tokens", type=positive_int,
                        help="score only the first N tokens of the text (a quick, partial run)")
    _add_model_flags(parser, max_seq_len=1024, batch_size=1)
    parser.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    """Check window and file, load the model, score, print and write JSON."""
    from pathlib import Path

    from qlorakit.eval import perplexity
    from qlorakit.eval.model_io import check_adapter_dir
    from qlorakit.fileio import write_json_atomic

    stride = perplexity.check_window(args.max_seq_len, args.stride)
    text = perplexity.read_text(args.data)
    check_adapter_dir(args.adapter)
    model, tokenizer = _load(args)
    all_ids = tokenizer(text)["input_ids"]
    ids = all_ids[: args.max_tokens] if args.max_tokens else all_ids
    result = perplexity.perplexity(model, ids, args.max_seq_len, stride, args.batch_size, not args.no_progress)
    print(perplexity.format_table(result, Path(args.data).name))
    out = result.as_dict() | _describe(args) | {"data": str(args.data), "max_tokens": args.max_tokens,
                                                     "file_tokens": len(all_ids)}
    print(f"wrote {write_json_atomic(args.output, out)}")
    return 0


def add_mmlu(evaluations: Any) -> None:
    """Register ``eval mmlu``: zero-/few-shot MMLU accuracy from the original folder layout."""
    parser: argparse.ArgumentParser = evaluations.add_parser(
        "mmlu", help="MMLU accuracy, zero- or k-shot, from DIR/dev and DIR/test CSV files",
        description="Standard MMLU prompt (header, k dev examples, the question ending 'Answer:'); the"
                    " prediction is the letter whose token (' A'..' D') has the highest logit. Reports accuracy"
                    " per subject, per category and the mean over subjects (fractions 0-1).")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with dev/<subject>_dev.csv and "
                        "test/<subject>_test.csv (header+index or no-header+letter CSV)")
    parser.add_argument("--shots", type=non_negative_int, default=5, help="few-shot examples (default: 5)")
    parser.add_argument("--limit", type=positive_int, help="first N test questions per subject (quick runs)")
    parser.add_argument("--subjects", nargs="+", metavar="SUBJECT",
                        help="only these subjects (default: all in DIR/test)")
    _add_model_flags(parser, max_seq_len=2048, batch_size=8)
    parser.set_defaults(func=run_mmlu)


def run_mmlu(args: argparse.Namespace) -> int:
    """Read and check every CSV, load the model, score, print and write JSON."""
    from qlorakit.eval import mmlu
    from qlorakit.eval.model_io import check_adapter_dir
    from qlorakit.fileio import write_json_atomic

    mmlu.load_subjects(args.data, args.shots, args.limit, args.subjects)
    check_adapter_dir(args.adapter)
    model, tokenizer = _load(args)
    result = mmlu.evaluate_mmlu(model, tokenizer, args.data, shots=args.shots, max_seq_len=args.max_seq_len,
                                batch_size=args.batch_size, limit=args.limit, subjects=args.subjects,
                                progress=not args.no_progress)
    print(mmlu.format_table(result))
    settings = {"shots": args.shots, "limit": args.limit, "max_seq_len": args.max_seq_len}
    out = result.as_dict() | _describe(args) | settings
    print(f"wrote {write_json_atomic(args.output, out)}")
    return 0
