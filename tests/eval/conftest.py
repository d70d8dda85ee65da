"""Fixtures for the model evaluations (perplexity, MMLU): SmolLM2's tokenizer and a tiny model directory."""

from __future__ import annotations

from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tokenizer(shared_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_dir / "models" / "smollm2-135m-instruct"), gguf_file=GGUF)


@pytest.fixture(scope="session")
def tiny_dir(smol_tokenizer, save_tiny_llama) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) saved with SmolLM2's tokenizer, loadable by ``--model DIR``."""
    return save_tiny_llama("tiny-llama", smol_tokenizer, vocab_size=len(smol_tokenizer), hidden_size=32)
