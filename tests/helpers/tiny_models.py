"""Tiny random causal LMs for the loading tests: four architectures, saved as safetensors (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from qlorakit.config import QuantConfig
from qlorakit.lora.targets import resolve_targets
from qlorakit.quant import dequantize_4bit, quantize_4bit
from tests.helpers.tiny_llama import TINY_LLAMA

_COMMON = {**TINY_LLAMA, "intermediate_size": 96, "head_dim": 16, "max_position_embeddings": 64}

#: name -> (config class, extra fields). Qwen2 has q/k/v biases; Gemma ties its head and scales embeddings.
ARCHS = {
    "llama": (transformers.LlamaConfig, {"tie_word_embeddings": False}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": False}),
    "gemma": (transformers.GemmaConfig, {"tie_word_embeddings": True}),
}


def tiny_config(arch: str, **overrides):
    cls, extra = ARCHS[arch]
    return cls(**{**_COMMON, **extra, **overrides})


def make_model(arch: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model whose every parameter (biases and norms included) is non-trivial."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    return model.eval()


def save(model: transformers.PreTrainedModel, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def dequantized_reference(model: transformers.PreTrainedModel, quant: QuantConfig) -> transformers.PreTrainedModel:
    """``model`` with every all-linear target weight W replaced by dequantize(quantize(W)) — in place."""
    with torch.no_grad():
        for path in resolve_targets(model, "all-linear"):
            linear = model.get_submodule(path)
            q = quantize_4bit(linear.weight.data, quant.quant_type, quant.blocksize, quant.double_quant)
            linear.weight.copy_(dequantize_4bit(q, torch.float32))
    return model


def input_ids(batch: int = 2, length: int = 7, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
