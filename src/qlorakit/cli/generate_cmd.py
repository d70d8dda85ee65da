"""``qlorakit generate``: complete prompts with a 4-bit base model and, per request, one of its adapters.

    qlorakit generate --model SOURCE [--adapter [NAME=]DIR ...] [--use NAME] --prompt TEXT [--prompt ...]
                      [--prompts FILE.jsonl] [--max-new-tokens N] [--temperature T --top-p P --seed S]
                      [--chat-template on|off] [--output FILE.jsonl]

The text is streamed to stdout as it is generated; a summary per prompt goes to stderr. Prompts, adapter
names and the output path are checked before the model is loaded, and every adapter is checked against
the base before anything is generated. ``--temperature 0`` (the default) is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from qlorakit.constants import BASE_QUANT_TYPES, QUANT_NONE
from qlorakit.errors import ConfigError

DTYPES = ("float32", "bfloat16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model, adapter and sampling flags shared by ``generate`` and ``chat``."""
    parser.add_argument("--model", required=True, help="base model: directory, .gguf file, alias or Hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="a PEFT adapter to load (repeatable); NAME defaults to the directory's name")
    parser.add_argument("--use", metavar="NAME", help="adapter used by default (default: the first --adapter; "
                        "'base' for none)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="load adapters whose base_model_name_or_path names another model (shapes still checked)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="most new tokens per reply (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus mass kept when sampling (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    parser.add_argument("--quant-type", choices=BASE_QUANT_TYPES, default="nf4",
                        help="how the base is loaded (default: %(default)s; none = 16/32-bit)")
    parser.add_argument("--no-quantize", action="store_true", help="keep the base in 16/32 bit (= --quant-type none)")
    parser.add_argument("--compute-dtype", choices=DTYPES, default="float32",
                        help="compute dtype (default: %(default)s)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="complete prompts with a 4-bit base (+ adapters), streamed",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="JSON Lines of {\"prompt\": ...} or {\"turns\": [...]} "
                   "rows, each optionally with \"adapter\": NAME")
    p.add_argument("--chat-template", choices=("on", "off"), default="on",
                   help="wrap each prompt as a user turn in the tokenizer's chat template (default: %(default)s; "
                   "a tokenizer without one gets the raw prompt)")
    p.add_argument("--output", metavar="FILE.jsonl", help="also write one JSON object per prompt here")
    p.set_defaults(func=run)


def sampling_from_args(args: argparse.Namespace):
    from qlorakit.generate import SamplingConfig

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    return SamplingConfig(temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p, seed=args.seed)


def parse_adapters(args: argparse.Namespace, requested: list[str | None]) -> tuple[list, str | None]:
    """The adapter specs and the default adapter name, after checking every requested name exists."""
    from qlorakit.generate import BASE_ONLY, AdapterSpec
    from qlorakit.lora import check_adapter_dir

    specs = [AdapterSpec.parse(text) for text in args.adapter]
    for spec in specs:
        check_adapter_dir(spec.path)
    known = [s.name for s in specs] + [BASE_ONLY]
    for name in [args.use, *requested]:
        if name is not None and name not in known:
            raise ConfigError(f"adapter {name!r} is not loaded; loaded: {known} (add --adapter {name}=DIR)")
    default = args.use if args.use is not None else (specs[0].name if specs else None)
    return specs, default


def load_for_generation(args: argparse.Namespace, specs: list) -> tuple[Any, Any]:
    """Check the adapters' declared bases, load the base (NF4 unless ``--no-quantize``), its tokenizer and
    every adapter (each checked against the loaded layers before it is added)."""
    import torch

    from qlorakit.config import QuantConfig
    from qlorakit.generate import load_adapters
    from qlorakit.generate.adapters import check_base_name
    from qlorakit.models import load_model, load_tokenizer, resolve_source

    source = resolve_source(args.model)
    base_names = [args.model, str(source.path), str(source.directory)]
    if not args.allow_other_base:
        for spec in specs:  # before the (slow) load: a wrong base fails in a second
            check_base_name(spec, base_names)
    tokenizer = load_tokenizer(source)
    model = load_model(source, quant=QuantConfig(quant_type=QUANT_NONE if args.no_quantize else args.quant_type),
                       compute_dtype=getattr(torch, args.compute_dtype))
    base_names.append(getattr(model.config, "name_or_path", ""))
    load_adapters(model, specs, base_names, allow_other_base=args.allow_other_base)
    return model, tokenizer


def _requests(args: argparse.Namespace) -> list:
    from qlorakit.generate.requests import Request, read_prompt_file

    requests = [Request(p) for p in args.prompt if p.strip()]
    if args.prompts:
        requests += read_prompt_file(args.prompts)
    if not requests:
        raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return requests


def _prompt_ids(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    from qlorakit.generate import chat_prompt_ids

    if chat_template:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


def run(args: argparse.Namespace) -> int:
    from qlorakit.fileio import write_text_atomic
    from qlorakit.generate import generate_text, use_adapter

    sampling = sampling_from_args(args)
    requests = _requests(args)
    specs, default = parse_adapters(args, [r.adapter for r in requests])
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a directory; give a .jsonl file path")
    model, tokenizer = load_for_generation(args, specs)
    template = args.chat_template == "on" and bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for request in requests:
        adapter = request.adapter or default
        use_adapter(model, adapter)
        ids = _prompt_ids(tokenizer, request.prompt, template)
        start = time.perf_counter()
        result = generate_text(model, tokenizer, ids, args.max_new_tokens, sampling,
                               on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        seconds = time.perf_counter() - start
        sys.stdout.write("\n")
        rate = len(result.token_ids) / seconds if seconds > 0 else 0.0
        print(f"[{request.where} adapter={adapter or 'base'}: {len(result.token_ids)} tokens, "
              f"{rate:.1f} tokens/s, stop={result.finish_reason}]", file=sys.stderr)
        rows.append({"prompt": request.prompt, "adapter": adapter or "base", "text": result.text,
                     "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                     "prompt_tokens": len(ids), "seconds": round(seconds, 4)})
    if args.output:
        import json

        write_text_atomic(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return 0
