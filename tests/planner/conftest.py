"""Fixtures for planner tests: a tiny random Llama written as a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = {"vocab_size": 256, "intermediate_size": 160, "tie_word_embeddings": False}


@pytest.fixture(scope="session")
def tiny_llama_dir(save_tiny_llama) -> Path:
    """A 2-layer Llama (GQA, untied head) saved as safetensors + config.json."""
    return save_tiny_llama("plan_tiny_llama", **TINY)
