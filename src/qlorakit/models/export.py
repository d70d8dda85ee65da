"""Merge LoRA adapters into the base weights and write a standard Hugging Face checkpoint.

For every adapted linear with frozen base ``W`` (dequantized from 4-bit when it is a ``Linear4bit``):

    W_merged = W + scale * B @ A        (computed in fp32, then cast once to the export dtype)

The result is a plain ``config.json`` + ``model.safetensors`` (sharded with an index above
``max_shard_bytes``) + tokenizer files that ``transformers`` loads with no qlorakit and no adapter, so
inference has no LoRA overhead. A merged model is never re-quantized silently: ``quantize=QuantConfig(...)``
writes the bitsandbytes 4-bit layout instead and reports the error that re-quantization added,
``||W_merged - dequant(quant(W_merged))||_F / ||W_merged||_F`` per layer.

Everything is written into a temporary sibling of ``out_dir`` and renamed into place;
``check_output_dir`` refuses an output path whose replacement could delete anything else (``.``,
``..``, a root, a symlink, or a directory holding the merge's own inputs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.errors import ConfigError, StateDictError
from qlorakit.fileio import write_dir_atomic
from qlorakit.lora import LoraLinear, linear_names
from qlorakit.quant import Linear4bit, dequantize_4bit, quantize_4bit
from qlorakit.quant.tensor import dtype_name

MAX_SHARD_BYTES = 4 * 2**30


@dataclass
class ExportReport:
    """What ``merge_and_export`` wrote."""

    out_dir: Path
    merged_layers: int = 0
    files: list[str] = field(default_factory=list)
    requant_rel_error: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"wrote {self.out_dir} ({', '.join(self.files)}); merged {self.merged_layers} adapted layers"]
        if self.requant_rel_error:
            errs = list(self.requant_rel_error.values())
            lines.append(f"re-quantization added relative error: mean {sum(errs) / len(errs):.4%}, max {max(errs):.4%} "
                         f"over {len(errs)} layers")
        return "\n".join(lines)


def merged_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 ``(out, in)`` weight of a linear with its active adapter folded in (DoRA: ``m/n (W + s B A)``)."""
    base = module.base_layer if isinstance(module, LoraLinear) else module
    weight = (dequantize_4bit(base.qweight, torch.float32) if isinstance(base, Linear4bit)
              else base.weight.detach().float())
    if _adds_adapter(module):
        weight = module.merged_weight(module.active_adapter, weight)  # (out, in) fp32
    if not torch.isfinite(weight).all():
        raise StateDictError("merged weight has non-finite values; refusing to export")
    return weight


def _adds_adapter(module: nn.Module) -> bool:
    """True when the module's forward adds an adapter that its base weight does not already hold."""
    return (isinstance(module, LoraLinear) and module.active_adapter is not None and module.enabled
            and module.merged_adapter is None)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted or 4-bit linears by path (a LoraLinear's own base layer is not listed separately)."""
    modules = {path: model.get_submodule(path) for path in linear_names(model)}
    return {path: m for path, m in modules.items() if isinstance(m, (LoraLinear, Linear4bit))}


def export_state_dict(model: nn.Module, dtype: torch.dtype, quant: QuantConfig | None, report: ExportReport) -> dict:
    """HF-named tensors: merged linears (16-bit, or bnb 4-bit with ``quant``) and every other parameter."""
    linears = _linear_modules(model)
    out: dict[str, torch.Tensor] = {}
    for path, module in linears.items():
        weight = merged_weight(module)  # (out, in) fp32
        report.merged_layers += _adds_adapter(module)
        if quant is None:
            out[f"{path}.weight"] = weight.to(dtype).contiguous()
        else:
            q = quantize_4bit(weight.to(dtype), quant.quant_type, quant.blocksize, quant.double_quant,
                              name=f"{path}.weight")
            rel = float((dequantize_4bit(q, torch.float32) - weight).norm() / weight.norm().clamp(min=1e-30))
            report.requant_rel_error[path] = rel
            out[f"{path}.weight"] = q.packed
            out.update({f"{path}.weight.{k}": v for k, v in q.to_bnb_dict().items()})
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if base.bias is not None:
            out[f"{path}.bias"] = base.bias.detach().to(dtype).contiguous()
    inside = tuple(f"{p}." for p in linears)
    seen: set[int] = set()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if name.startswith(inside) or _is_non_persistent(model, name):
            continue
        if tensor.data_ptr() in seen and name.endswith("lm_head.weight"):
            continue  # tied to the input embedding; transformers re-ties it on load
        seen.add(tensor.data_ptr())
        out[name] = (tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()).contiguous()
    return out


def _is_non_persistent(model: nn.Module, name: str) -> bool:
    owner_path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    return leaf in getattr(owner, "_non_persistent_buffers_set", set())


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


def _export_config(model: nn.Module, dtype: torch.dtype, quant: QuantConfig | None) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = dtype_name(dtype)
    if quant is not None:
        config["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant.quant_type, "bnb_4bit_use_double_quant": quant.double_quant,
            "bnb_4bit_compute_dtype": dtype_name(dtype), "bnb_4bit_quant_storage": "uint8",
        }
    return config


def check_output_dir(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """``out_dir`` as a Path if writing (and, with overwrite, replacing) it can only touch that directory.

    Refused: a path whose last component is empty, ``.`` or ``..`` (the replaced directory would be the
    working directory or a parent), a filesystem root, a symlink (replacing it would follow it), and a
    directory that is, or holds, one of ``inputs`` (the base model or the adapter being merged).
    """
    out = Path(out_dir)
    if not out.name or out.name in (".", "..") or out.resolve() == Path(out.resolve().anchor):
        raise ConfigError(f"output directory {str(out_dir)!r} names no directory of its own; pass a new directory "
                          "path such as merged/")
    if out.is_symlink():
        raise ConfigError(f"output directory {out} is a symbolic link; pass the real directory")
    target = out.resolve()
    for source in map(Path, inputs):
        if source.exists() and (source.resolve() == target or target in source.resolve().parents):
            raise ConfigError(f"output directory {out} is or contains the input {source}; replacing it would delete "
                              "the input: choose another output directory")
    return out


def merge_and_export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer=None,
    quantize: QuantConfig | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ExportReport:
    """Write the merged model to ``out_dir`` (durably, ``fileio.write_dir_atomic``: every file fsynced, the
    directory renamed into place, its parent fsynced; an existing non-empty dir needs ``overwrite``)."""
    out = check_output_dir(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if quantize is not None and quantize.quant_type == "int4":
        raise ConfigError("int4 has no bitsandbytes checkpoint layout; export nf4 or fp4, or a 16-bit model")
    report = ExportReport(out_dir=out)

    def fill(directory: Path) -> None:
        tensors = export_state_dict(model, dtype, quantize, report)
        report.files = _write_shards(tensors, directory, max_shard_bytes)
        config = _export_config(model, dtype, quantize)
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        report.files.append("config.json")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    write_dir_atomic(out, fill)  # fsync every file, rename into place, fsync the parent
    return report
