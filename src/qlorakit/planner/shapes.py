"""The shapes a memory plan needs, read from a config alone: layers, widths, vocabulary, every linear.

A model is named by anything ``qlorakit.models.load_model`` takes (a local Hugging Face directory, a
``config.json`` file, a ``.gguf`` file, an alias, a Hub id) or by ``<N>b`` for a LLaMA-1 shape of the
QLoRA paper (``7b``, ``13b``, ``33b``, ``65b``; Touvron et al. 2023, Table 2: dimension, heads, layers;
feed-forward width ``2/3 * 4d`` rounded up to a multiple of 256; vocabulary 32,000; untied head).
The transformers model is built on the meta device (no weight is read or allocated) and its linears are
listed with the same target rules as loading (``qlorakit.lora.targets``): ``all-linear`` layers are
stored in 4 bits, the LoRA targets get adapters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.errors import ConfigError

#: LLaMA-1 shapes of the QLoRA paper: name -> (dim, layers, heads, feed-forward width).
LLAMA1_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "7b": (4096, 32, 32, 11008),
    "13b": (5120, 40, 40, 13824),
    "33b": (6656, 60, 52, 17920),
    "65b": (8192, 80, 64, 22016),
}
LLAMA1_VOCAB = 32000


@dataclass(frozen=True)
class LinearShape:
    """One linear layer: its path, ``(out, in)`` weight shape, and whether it is quantized / adapted."""

    path: str
    in_features: int
    out_features: int
    quantized: bool
    adapted: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model (parameter counts, not bytes)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool
    linears: tuple[LinearShape, ...]
    embedding_params: int  # input embeddings + an untied output head
    norm_params: int
    other_params: int  # unquantized parameters that are neither embeddings nor norms (biases, ...)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of the key (and value) projection: ``kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def total_params(self) -> int:
        linear = sum(lin.numel for lin in self.linears if lin.quantized)
        return linear + self.embedding_params + self.norm_params + self.other_params


def llama1_config(name: str) -> Any:
    """The ``transformers.LlamaConfig`` of LLaMA-1 ``7b`` / ``13b`` / ``33b`` / ``65b``."""
    from transformers import LlamaConfig

    key = name.lower()
    if key not in LLAMA1_SHAPES:
        raise ConfigError(f"unknown model size {name!r}; the LLaMA-1 shapes are {', '.join(LLAMA1_SHAPES)}")
    dim, layers, heads, ffn = LLAMA1_SHAPES[key]
    return LlamaConfig(
        vocab_size=LLAMA1_VOCAB, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip


def is_size_name(text: str) -> bool:
    """``7b``, ``65B``, ``1.5b``: a size name rather than a path or model id."""
    body = text.lower().removesuffix("b")
    return text.lower().endswith("b") and body.replace(".", "", 1).isdigit()


def read_config(model: str | os.PathLike, trust_remote_code: bool = False) -> tuple[str, Any]:
    """(display name, transformers config) of ``model``: ``<N>b``, a ``config.json`` file, or any source."""
    from qlorakit.models.build import load_config
    from qlorakit.models.gguf import gguf_config
    from qlorakit.models.gguf_reader import read_gguf_header
    from qlorakit.models.source import GGUF, resolve_source

    text = str(model)
    if is_size_name(text) and not Path(text).exists():
        return f"LLaMA-1 {text.upper()}", llama1_config(text)
    path = Path(text)
    if path.is_file() and path.name.endswith(".json"):
        return text, _config_from_json(path, trust_remote_code)
    source = resolve_source(model)
    if source.kind == GGUF:
        return source.origin, gguf_config(read_gguf_header(source.path))
    return source.origin, load_config(source, trust_remote_code)


def _config_from_json(path: Path, trust_remote_code: bool) -> Any:
    from qlorakit.models.build import load_config
    from qlorakit.models.source import resolve_source

    if path.name != "config.json":
        raise ConfigError(f"{path}: a model config file must be named config.json (a Hugging Face config)")
    return load_config(resolve_source(path.parent), trust_remote_code)


def model_shape(
    model: str | os.PathLike, lora_targets: str | tuple[str, ...] = "all-linear", trust_remote_code: bool = False
) -> ModelShape:
    """The shape of ``model`` (see the module docstring) with ``lora_targets`` marked as adapted."""
    from qlorakit.models.build import build_empty_model

    name, config = read_config(model, trust_remote_code)
    meta = build_empty_model(config, compute_dtype=torch.float32, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1))
    return ModelShape(
        name=name, num_layers=int(text.num_hidden_layers), hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", 4 * hidden)), num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), vocab_size=int(text.vocab_size),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        linears=_linears(meta, lora_targets), **_unquantized_counts(meta),
    )  # fmt: skip


def _linears(meta: nn.Module, lora_targets: str | tuple[str, ...]) -> tuple[LinearShape, ...]:
    from qlorakit.lora.targets import resolve_targets

    quantized = resolve_targets(meta, "all-linear")
    adapted = set(resolve_targets(meta, lora_targets))
    return tuple(
        LinearShape(path, meta.get_submodule(path).in_features, meta.get_submodule(path).out_features,
                    quantized=True, adapted=path in adapted)
        for path in quantized
    ) + tuple(
        LinearShape(path, meta.get_submodule(path).in_features, meta.get_submodule(path).out_features,
                    quantized=False, adapted=True)
        for path in sorted(adapted - set(quantized))
    )  # fmt: skip


def _unquantized_counts(meta: nn.Module) -> dict[str, int]:
    """Parameters outside the 4-bit linears, each tied parameter once: embeddings/head, norms, the rest."""
    from qlorakit.lora.targets import resolve_targets
    from qlorakit.models.build import norm_parameter_names

    quantized = {id(meta.get_submodule(p).weight) for p in resolve_targets(meta, "all-linear")}
    embeddings = {id(m.weight) for m in meta.modules() if isinstance(m, nn.Embedding)}
    head = meta.get_output_embeddings() if hasattr(meta, "get_output_embeddings") else None
    if head is not None:
        embeddings.add(id(head.weight))
    norms = {id(p) for n, p in meta.named_parameters() if n in norm_parameter_names(meta)}
    counts = {"embedding_params": 0, "norm_params": 0, "other_params": 0}
    for p in meta.parameters():  # each shared parameter once
        if id(p) in quantized:
            continue
        kind = "embedding_params" if id(p) in embeddings else "norm_params" if id(p) in norms else "other_params"
        counts[kind] += p.numel()
    return counts
