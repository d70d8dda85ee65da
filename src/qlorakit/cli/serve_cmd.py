"""``qlorakit serve``: an OpenAI-compatible server for a 4-bit base and its LoRA adapters, batched together.

    qlorakit serve --model SOURCE [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--max-batch N] [--max-queue N] [--max-tokens-limit N]

A request's ``model`` names an adapter (or the base). Adapters are checked before the model loads (files,
declared base) and against its layers before they are added; more can be added and removed while it
runs (POST /v1/adapters, DELETE /v1/adapters/NAME). Needs the ``serve`` extra:
``pip install 'qlorakit[serve]'``. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from qlorakit.errors import ConfigError

#: The packages ``qlorakit serve`` needs beyond the core (the ``serve`` extra of pyproject.toml).
SERVE_PACKAGES = ("fastapi", "uvicorn")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server, per-request adapters on one 4-bit base",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: directory, .gguf file, alias or Hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="a PEFT adapter served as model NAME (repeatable)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept adapters whose base_model_name_or_path names another model (shapes still checked)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before 429 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="most new tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096,
                   help="longest prompt, in tokens, before 413 (default: %(default)s)")
    p.add_argument("--no-quantize", action="store_true", help="keep the base in 16/32 bit instead of NF4")
    p.set_defaults(func=run)


def check_serve_packages() -> None:
    """Fail with the install command when the ``serve`` extra is missing."""
    import importlib.util

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"qlorakit serve needs {', '.join(missing)}, which is not installed; install the serve "
                          "extra: pip install 'qlorakit[serve]'")


def run(args: argparse.Namespace) -> int:
    from qlorakit.generate import AdapterSpec
    from qlorakit.generate.adapters import model_key
    from qlorakit.lora import check_adapter_dir

    check_serve_packages()
    from qlorakit.serve.config import ServeConfig, exposure_warning

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                         max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                         max_prompt_tokens=args.max_prompt_tokens,
                         default_max_tokens=min(256, args.max_tokens_limit))
    specs = [AdapterSpec.parse(text) for text in args.adapter]
    for spec in specs:
        check_adapter_dir(spec.path)
    warning = exposure_warning(config.host, config.api_key)
    if warning:
        print(warning, file=sys.stderr)
    engine = _load(args, config, specs, model_key(args.model))
    import uvicorn

    from qlorakit.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"serving {engine.registry.base_id} and adapters {engine.registry.names()} on "
          f"http://{config.host}:{config.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(create_app(engine, config), host=config.host, port=config.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def _load(args: argparse.Namespace, config: Any, specs: list, base_id: str) -> Any:
    import torch

    from qlorakit.config import QuantConfig
    from qlorakit.generate.adapters import check_base_name
    from qlorakit.models import load_model, load_tokenizer, resolve_source
    from qlorakit.serve.runner import build_engine

    source = resolve_source(args.model)
    base_names = [args.model, str(source.path), str(source.directory)]
    if not args.allow_other_base:
        for spec in specs:  # before the (slow) load
            check_base_name(spec, base_names)
    tokenizer = load_tokenizer(source)
    model = load_model(source, quant=None if args.no_quantize else QuantConfig(), compute_dtype=torch.float32)
    base_names.append(getattr(model.config, "name_or_path", ""))
    return build_engine(model, tokenizer, base_id, base_names, config, specs, args.allow_other_base)
