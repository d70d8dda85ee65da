"""Describe a model from its config alone: architecture, parameter counts, what 4-bit storage would cost.

The model is built on the meta device (no weights read, nothing allocated), so this is fast even for
large models. Sizes: targets at ``bits_per_param(quant)`` bits (4.127 for NF4 + double quant at block
64), norms at 32 bits (they stay fp32), everything else (embeddings, head, biases) at 16 bits; the
16-bit size counts every parameter at 16 bits. A tied head is counted once.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.lora.targets import resolve_targets
from qlorakit.models.build import build_empty_model, load_config, norm_parameter_names
from qlorakit.models.gguf import gguf_config
from qlorakit.models.gguf_reader import read_gguf_header
from qlorakit.models.source import BNB_4BIT, GGUF, ModelSource, resolve_source
from qlorakit.quant.functional import bits_per_param


@dataclass(frozen=True)
class ModelSummary:
    """What ``qlorakit inspect`` prints (sizes in bytes)."""

    source: str
    kind: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    total_params: int
    target_params: int
    embedding_params: int
    norm_params: int
    other_params: int
    target_modules: dict[str, int]  # short name -> count
    quant_format: str
    bits_per_param: float
    bytes_4bit: int
    bytes_16bit: int
    file_tensor_types: dict[str, int] = field(default_factory=dict)  # GGUF only: ggml type -> tensor count

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_source(
    source: str | os.PathLike, quant: QuantConfig | None = None, trust_remote_code: bool = False
) -> ModelSummary:
    """Summarize ``source`` (any kind ``load_model`` takes) without reading its weights; ``quant``
    (default NF4, block 64, double quant) sets the 4-bit size."""
    resolved = source if isinstance(source, ModelSource) else resolve_source(source)
    tensor_types: dict[str, int] = {}
    if resolved.kind == GGUF:
        header = read_gguf_header(resolved.path)
        config = gguf_config(header)
        tensor_types = dict(Counter(t.type_name for t in header.tensors).most_common())
    else:
        config = load_config(resolved, trust_remote_code)
    model = build_empty_model(config, compute_dtype=torch.float32, trust_remote_code=trust_remote_code)
    quant_format, bpp = _format(resolved, quant or QuantConfig())
    counts = _count(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelSummary(
        source=resolved.origin, kind=resolved.kind,
        architecture=type(model).__name__, model_type=str(getattr(config, "model_type", "")),
        num_layers=int(getattr(text, "num_hidden_layers", 0)), hidden_size=int(getattr(text, "hidden_size", 0)),
        vocab_size=int(getattr(text, "vocab_size", 0)),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        quant_format=quant_format, bits_per_param=bpp,
        bytes_4bit=int(counts["target_params"] * bpp / 8 + counts["norm_params"] * 4
                       + (counts["embedding_params"] + counts["other_params"]) * 2),
        bytes_16bit=2 * counts["total_params"], file_tensor_types=tensor_types, **counts,
    )  # fmt: skip


def _format(source: ModelSource, quant: QuantConfig) -> tuple[str, float]:
    """The 4-bit format a load would use: the saved one for a bitsandbytes 4-bit directory."""
    if source.kind == BNB_4BIT:
        saved = source.config_json()["quantization_config"]
        quant = QuantConfig(
            quant_type=saved.get("bnb_4bit_quant_type", "fp4"), blocksize=64,
            double_quant=bool(saved.get("bnb_4bit_use_double_quant", False)),
        )  # fmt: skip
    name = f"{quant.quant_type.upper()}, block {quant.blocksize}" + (", double quant" if quant.double_quant else "")
    return name, bits_per_param(quant.quant_type, quant.blocksize, quant.double_quant)


def _count(model: nn.Module) -> dict[str, Any]:
    targets = resolve_targets(model, "all-linear")
    norms = norm_parameter_names(model)
    target_weights = {id(model.get_submodule(t).weight) for t in targets}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embeddings.add(id(head.weight))
    norm_ids = {id(p) for n, p in model.named_parameters() if n in norms}
    totals = Counter()
    for p in model.parameters():  # each tied parameter once
        kind = (
            "target"
            if id(p) in target_weights
            else "embedding"
            if id(p) in embeddings
            else "norm"
            if id(p) in norm_ids
            else "other"
        )
        totals[kind] += p.numel()
    return {
        "total_params": sum(totals.values()), "target_params": totals["target"],
        "embedding_params": totals["embedding"], "norm_params": totals["norm"], "other_params": totals["other"],
        "target_modules": dict(Counter(t.rsplit(".", 1)[-1] for t in targets)),
    }  # fmt: skip


def format_summary(s: ModelSummary) -> str:
    """The human-readable report ``qlorakit inspect`` prints."""
    gib = 2**30
    per_layer = ", ".join(f"{name} x{count}" for name, count in s.target_modules.items())
    lines = [
        f"source            {s.source} ({s.kind})",
        f"architecture      {s.architecture} (model_type {s.model_type})",
        (
            f"layers            {s.num_layers}   hidden {s.hidden_size}   vocab {s.vocab_size}"
            f"   tied embeddings {s.tied_embeddings}"
        ),
        f"parameters        {s.total_params:,}",
        f"  in targets      {s.target_params:,} ({100 * s.target_params / max(1, s.total_params):.1f}%)",
        f"  embeddings/head {s.embedding_params:,}",
        f"  norms           {s.norm_params:,}",
        f"  other           {s.other_params:,}",
        f"quantized modules {sum(s.target_modules.values())}: {per_layer}",
        f"4-bit format      {s.quant_format} ({s.bits_per_param:.3f} bits/param)",
        f"size, 4-bit       {s.bytes_4bit / gib:.3f} GiB (targets 4-bit, norms fp32, rest 16-bit)",
        f"size, 16-bit      {s.bytes_16bit / gib:.3f} GiB ({s.bytes_4bit / max(1, s.bytes_16bit):.2f}x)",
    ]
    if s.file_tensor_types:
        lines.append("GGUF tensor types " + ", ".join(f"{k} x{v}" for k, v in s.file_tensor_types.items()))
    return "\n".join(lines)
