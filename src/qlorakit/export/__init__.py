"""Exports for other runtimes: a merged model as one GGUF file, an adapter as a llama.cpp LoRA GGUF, and an
Ollama ``Modelfile`` beside them (docs/export.md).

``export_gguf(model, source, path, out_type)`` writes the model with its active adapter folded in;
``export_gguf_adapter(model, path)`` writes the active adapter alone; ``write_modelfile`` the Ollama recipe.
This package reads models, lora and quant; only the CLI imports it. Names are imported on first use, so
``qlorakit --help`` (which reads ``gguf_types``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "AdapterExportReport": "gguf_adapter", "export_gguf_adapter": "gguf_adapter",
    "ARCHS": "gguf_arch", "arch_of": "gguf_arch",
    "GgufExportReport": "gguf_model", "export_gguf": "gguf_model",
    "ADAPTER_TYPES": "gguf_types", "OUTPUT_TYPES": "gguf_types", "check_output_type": "gguf_types",
    "write_modelfile": "modelfile",
}  # fmt: skip

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'qlorakit.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qlorakit.export.{_HOMES[name]}"), name)
