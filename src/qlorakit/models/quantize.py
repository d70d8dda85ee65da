"""Quantizing a model that is already in memory: every target ``nn.Linear`` becomes an NF4 ``Linear4bit``.

``load_model`` quantizes while it streams a checkpoint in and never holds the 16-bit model; this module is
for a model the caller built or loaded some other way (a ``transformers`` model in memory, a test's tiny
Llama). The weights are quantized one linear at a time, ``W -> (codes, absmax[, nested absmax])`` as in
``qlorakit.quant.functional.quantize_4bit``, and the frozen 16/32-bit originals are released as each is
replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.errors import ModelLoadError
from qlorakit.lora.targets import resolve_targets
from qlorakit.quant.linear import Linear4bit


def quantize_model(
    model: nn.Module,
    quant: QuantConfig | None = None,
    targets: str | list[str] = "all-linear",
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace each target linear of ``model`` (resolved as LoRA targets are) by a ``Linear4bit``, in place.

    Returns the replaced module paths. The whole model is frozen (``requires_grad_(False)``) afterwards, as
    a QLoRA base is; add adapters with ``qlorakit.lora.add_lora``.
    """
    quant = quant or QuantConfig()
    paths = resolve_targets(model, targets)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:
            raise ModelLoadError(f"target {path} is a {type(linear).__name__}, not an nn.Linear; cannot quantize it")
        setattr(parent, child, Linear4bit.from_linear(
            linear, quant.quant_type, quant.blocksize, quant.double_quant, compute_dtype=compute_dtype, name=path))
    model.requires_grad_(False)
    return paths
