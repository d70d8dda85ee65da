"""Fixtures for the data tests: the real SmolLM2 tokenizer (ChatML template) and a copy without a template."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tok(shared_dir: Path):
    """SmolLM2-135M-Instruct's tokenizer: byte-level BPE, ChatML template, EOS = pad = <|im_end|> (2), no BOS."""
    model_dir = shared_dir / "models" / "smollm2-135m-instruct"
    if not (model_dir / GGUF).is_file():
        pytest.skip(f"shared model not found at {model_dir}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), gguf_file=GGUF)


@pytest.fixture(scope="session")
def plain_tok(tok):
    """The same GPT-2-style tokenizer with no chat template (conversations fall back to Guanaco)."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data"
