"""The tiny random Llama of the tests: one configuration, changed per test by keyword overrides.

``TINY_LLAMA`` is 2 layers of hidden size 64 with grouped-query attention (4 query heads, 2 key/value
heads) over a 128-token vocabulary; ``intermediate_size`` is twice ``hidden_size`` unless overridden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2,
}  # fmt: skip


def tiny_llama_config(**overrides: Any):
    """A ``transformers.LlamaConfig`` of ``TINY_LLAMA`` updated by ``overrides`` (any LlamaConfig field)."""
    import transformers

    fields = {**TINY_LLAMA, **overrides}
    fields.setdefault("intermediate_size", 2 * fields["hidden_size"])
    return transformers.LlamaConfig(**fields)


def save_tiny_llama(directory: Path, tokenizer: Any = None, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny Llama (``torch.manual_seed(seed)``) saved in ``directory``, with ``tokenizer`` beside it
    when given: a model directory that ``load_model`` and ``--model DIR`` accept."""
    import transformers

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
