"""Fixtures for planner tests: a tiny random Llama written as a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (GQA, untied head) saved as safetensors + config.json."""
    import transformers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("plan_tiny_llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path
