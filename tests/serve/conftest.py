"""A tiny NF4 Llama with a small chat tokenizer (``tests.helpers.tiny_tokenizer``), three random adapters,
and servers on 127.0.0.1 with an ephemeral port.

``server`` has adapters ``x`` and ``y`` and an API key; ``reference`` is a second copy of the same base and
adapters for decoding requests one at a time (``generate_text``), the oracle of the server's answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from qlorakit.config import LoraConfig, QuantConfig  # noqa: E402
from qlorakit.generate import AdapterSpec, chat_prompt_ids, generate_text, use_adapter  # noqa: E402
from qlorakit.generate.sampling import SamplingConfig  # noqa: E402
from qlorakit.lora import load_adapter, save_adapter  # noqa: E402
from qlorakit.models import load_model, load_tokenizer  # noqa: E402
from qlorakit.serve.config import ServeConfig  # noqa: E402
from qlorakit.serve.runner import BackgroundServer, build_engine  # noqa: E402
from tests.helpers.lora import randomize_lora_b  # noqa: E402
from tests.helpers.tiny_tokenizer import tiny_chat_tokenizer  # noqa: E402

KEY = "test-key"
BASE_ID = "tiny"
LIMITS = {"max_body_bytes": 32_768, "max_prompt_tokens": 200, "max_tokens_limit": 1500, "default_max_tokens": 12}


@pytest.fixture(scope="session")
def base_dir(save_tiny_llama) -> Path:
    tokenizer = tiny_chat_tokenizer()
    return save_tiny_llama("serve-base", tokenizer, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def adapter_dirs(base_dir, tmp_path_factory) -> dict[str, Path]:
    """Three PEFT adapters of the tiny base on every projection, random nonzero B (different seeds)."""
    root, dirs = tmp_path_factory.mktemp("serve-adapters"), {}
    for seed, name in enumerate(("x", "y", "z"), start=1):
        model = load_model(base_dir, quant=QuantConfig(), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
        randomize_lora_b(model, "default", std=0.5, seed=seed)
        dirs[name] = save_adapter(model, root / name)
    return dirs


def _load(base_dir: Path, adapters: dict[str, Path]):
    model = load_model(base_dir, quant=QuantConfig(), compute_dtype=torch.float32).eval()
    return model, load_tokenizer(base_dir)


def start_server(base_dir: Path, adapters: dict[str, Path], **settings) -> BackgroundServer:
    model, tokenizer = _load(base_dir, adapters)
    config = ServeConfig(host="127.0.0.1", port=0, **{**LIMITS, **settings})
    specs = [AdapterSpec(name, path) for name, path in adapters.items()]
    engine = build_engine(model, tokenizer, BASE_ID, [str(base_dir)], config, specs)
    return BackgroundServer(engine, config)


@pytest.fixture(scope="session")
def server(base_dir, adapter_dirs):
    running = start_server(base_dir, {n: adapter_dirs[n] for n in ("x", "y")}, api_key=KEY)
    yield running
    running.close()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


class Reference:
    """The same base and adapters, decoding one request at a time with ``generate_text``."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path]) -> None:
        self.model, self.tokenizer = _load(base_dir, adapters)
        for name, path in adapters.items():
            load_adapter(self.model, path, name=name)
        self.model.eval()

    def chat_ids(self, text: str) -> list[int]:
        return chat_prompt_ids(self.tokenizer, [{"role": "user", "content": text}])

    def chat(self, adapter: str | None, text: str, max_tokens: int, sampling: SamplingConfig | None = None):
        use_adapter(self.model, adapter)
        return generate_text(self.model, self.tokenizer, self.chat_ids(text), max_tokens,
                             sampling or SamplingConfig())


@pytest.fixture(scope="session")
def reference(base_dir, adapter_dirs) -> Reference:
    return Reference(base_dir, adapter_dirs)
