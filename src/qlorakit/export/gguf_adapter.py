"""``export_gguf_adapter``: a LoRA adapter alone as a llama.cpp adapter GGUF (``llama-cli -m base.gguf --lora a.gguf``).

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp`` reads:

- metadata ``general.architecture`` (the base's; llama.cpp refuses a mismatch), ``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha`` (float32);
- per adapted linear with GGUF base tensor ``T`` (``blk.3.attn_q.weight``): ``T.lora_a`` = ``A`` (r, in) and
  ``T.lora_b`` = ``B`` (out, r) in torch order (ggml ``ne`` = [in, r] and [r, out]); ``B`` of q/k gets llama's
  row permutation (``gguf_arch.permute_rows``), as the base's weight does.

llama.cpp scales each pair by ``adapter_scale * alpha / rank`` with ``rank = B.ne[0]`` (the user's
``--lora-scaled`` factor, 1 by default). qlorakit's scale is ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), so
``adapter.lora.alpha`` is written as ``scale * r``: the lora_alpha itself for plain LoRA, ``alpha * sqrt(r)``
for rsLoRA. llama.cpp has one alpha per file, so every layer must have the same ``scale * r``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qlorakit.errors import ConfigError
from qlorakit.export.gguf_arch import TensorNames, permute_rows, tied_head
from qlorakit.export.gguf_file import PlannedTensor, write_gguf
from qlorakit.export.gguf_types import encode, file_type, tensor_type
from qlorakit.lora import lora_layers


@dataclass
class AdapterExportReport:
    """What ``export_gguf_adapter`` wrote."""

    path: Path
    layers: int
    rank: int
    alpha: float
    nbytes: int
    seconds: float

    def format(self) -> str:
        return (f"wrote {self.path} ({self.nbytes / 2**20:.2f} MiB): {self.layers} LoRA layers, r={self.rank}, "
                f"adapter.lora.alpha={self.alpha:g}; run it with llama-cli -m BASE.gguf --lora {self.path.name}")


def _active_layers(model: nn.Module) -> dict[str, Any]:
    layers = {p: m for p, m in lora_layers(model).items() if m.active_adapter is not None}
    if not layers:
        raise ConfigError("the model has no active LoRA adapter to export; load one with load_adapter first")
    dora = next((p for p, m in layers.items() if m.active_adapter in m.lora_magnitude_vector), None)
    if dora is not None:
        raise ConfigError(f"{dora} carries a DoRA adapter; llama.cpp's LoRA GGUF has no magnitude vector. Export "
                          "the merged model instead (qlorakit export gguf merges DoRA exactly)")
    return layers


def gguf_alpha(layers: dict[str, Any]) -> tuple[float, int]:
    """(``adapter.lora.alpha``, rank): ``scale * r`` shared by every layer (module docstring)."""
    values = {}
    for path, layer in layers.items():
        name = layer.active_adapter
        r = layer.configs[name].r
        values[path] = (layer.scaling[name] * r, r)
    alphas = {round(a, 6) for a, _ in values.values()}
    if len(alphas) > 1:
        raise ConfigError(f"the adapter's layers have different alpha/r products {sorted(alphas)}; llama.cpp's "
                          "adapter format has one alpha per file")
    alpha, rank = next(iter(values.values()))
    return alpha, rank


def adapter_tensors(model: nn.Module, out_type: str) -> list[PlannedTensor]:
    """``<base>.lora_a`` / ``<base>.lora_b`` for every layer with an active adapter, in model order."""
    names = TensorNames(model.config)
    tied_head(model)  # refuses an adapter on a tied head
    planned = []
    for path, layer in _active_layers(model).items():
        base = names.gguf_name(f"{path}.weight")
        name = layer.active_adapter
        pairs = (
            ("lora_a", layer.lora_A[name].weight, None),
            ("lora_b", layer.lora_B[name].weight, names.row_heads(base)),
        )
        for suffix, weight, heads in pairs:
            shape = tuple(weight.shape)  # A (r, in), B (out, r)
            qtype = tensor_type(f"{base}.{suffix}", shape, out_type)

            def produce(weight=weight, heads=heads, qtype=qtype) -> np.ndarray:
                return encode(permute_rows(weight.detach().float().numpy(), heads), qtype)

            planned.append(PlannedTensor(f"{base}.{suffix}", shape, qtype, produce))
    return planned


def export_gguf_adapter(
    model: nn.Module, output: str | Path, out_type: str = "f32", overwrite: bool = False, progress: bool = True
) -> AdapterExportReport:
    """Write the active adapter of ``model`` as a llama.cpp LoRA GGUF (module docstring) to ``output``."""
    import gguf

    start = time.perf_counter()
    layers = _active_layers(model)
    alpha, rank = gguf_alpha(layers)
    names = TensorNames(model.config)
    tensors = adapter_tensors(model, out_type)

    def write_metadata(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_file_type(file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    path = write_gguf(
        Path(output), names.arch.gguf_name, write_metadata, tensors, overwrite=overwrite, progress=progress
    )
    return AdapterExportReport(path, len(layers), rank, alpha, path.stat().st_size, time.perf_counter() - start)
