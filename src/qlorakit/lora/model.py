"""Model-level LoRA: wrap target linears in ``LoraLinear``, pick the active adapter, freeze the rest.

``add_lora(model, config)`` wraps every linear that ``config.targets`` selects (see ``lora.targets``) and
makes the new adapter active. After ``add_lora``, ``set_active_adapter`` and ``load_adapter`` only the
active adapter's ``A`` and ``B`` require grad: the base (4-bit or not), embeddings, norms and the head are
frozen, which is what QLoRA trains.

``lora_state_dict(model, name)`` gives that adapter's weights under PEFT's saved key names,
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT drops the adapter name on
save), plus ``.lora_magnitude_vector`` (out,) for a DoRA adapter, so the dict can be written as
``adapter_model.safetensors`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError
from qlorakit.lora.layer import LoraLinear, MergeError
from qlorakit.lora.targets import resolve_targets
from qlorakit.quant.linear import Linear4bit

#: Prefix PEFT puts before module paths in a saved causal-LM adapter (PeftModel.base_model.model).
PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every ``LoraLinear`` in ``model`` by module path, in model order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model``, in the order they were first added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def _check_known(model: nn.Module, name: str) -> dict[str, LoraLinear]:
    layers = {p: m for p, m in lora_layers(model).items() if name in m.lora_A}
    if not layers:
        raise ConfigError(f"no adapter named {name!r} in the model; adapters: {adapter_names(model)}")
    return layers


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _freeze_all_but_active(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in lora_layers(model).values():
        if layer.active_adapter is not None:
            layer.lora_A[layer.active_adapter].weight.requires_grad_(True)
            layer.lora_B[layer.active_adapter].weight.requires_grad_(True)
            if layer.active_adapter in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[layer.active_adapter].weight.requires_grad_(True)


def base_module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths as the un-adapted model has them: a ``LoraLinear`` stands for its base, its insides hidden."""
    names: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        names[prefix] = module
        if isinstance(module, LoraLinear):
            return
        for child_name, child in module.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return names


def add_lora(
    model: nn.Module, config: LoraConfig, name: str = "default", dtype: torch.dtype = torch.float32
) -> list[str]:
    """Add adapter ``name`` to every target of ``config.targets``; return the adapted module paths.

    Plain linears are wrapped in a ``LoraLinear``; an existing ``LoraLinear`` gets one more adapter. The
    new adapter becomes active everywhere and is the only trainable thing in the model.
    """
    paths = resolve_targets(model, config.targets)
    add_lora_at(model, paths, config, name, dtype)
    return paths


def add_lora_at(
    model: nn.Module, paths: list[str], config: LoraConfig, name: str, dtype: torch.dtype = torch.float32
) -> None:
    """``add_lora`` on the given module paths (each must be a linear layer); the adapter becomes active."""
    taken = [p for p in paths if name in getattr(model.get_submodule(p), "lora_A", {})]
    if taken:
        raise ConfigError(f"adapter {name!r} already exists on {taken[0]}; delete it first or pick another name")
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _set_module(model, path, module)
        module.add_adapter(name, config, dtype=dtype)
    set_active_adapter(model, name)


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` active in every layer that has it (other LoRA layers run base-only); it alone trains."""
    _check_known(model, name)
    for layer in lora_layers(model).values():
        layer.set_active(name if name in layer.lora_A else None)
    _freeze_all_but_active(model)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """``False``: every LoRA layer computes the base output only (the active adapter is remembered)."""
    for layer in lora_layers(model).values():
        layer.set_enabled(enabled)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """``with disable_adapters(model): ...`` runs the base model, then restores each layer's flag."""
    layers = lora_layers(model)
    before = {path: layer.enabled for path, layer in layers.items()}
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        for path, layer in layers.items():
            layer.set_enabled(before[path])


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a ``LoraLinear`` left without adapters is replaced by its base layer."""
    layers = _check_known(model, name)
    merged = [p for p, m in layers.items() if m.merged_adapter == name]
    if merged:
        raise MergeError(f"adapter {name!r} is merged into {merged[0]}; unmerge it before deleting")
    for path, layer in layers.items():
        layer.delete_adapter(name)
        if not layer.adapter_names:
            _set_module(model, path, layer.base_layer)
    _freeze_all_but_active(model)


def merge_adapters(model: nn.Module) -> None:
    """Merge the active adapter of every LoRA layer into its 16/32-bit base (all layers checked first)."""
    layers = {p: m for p, m in lora_layers(model).items() if m.active_adapter is not None and m.merged_adapter is None}
    four_bit = [p for p, m in layers.items() if isinstance(m.base_layer, Linear4bit)]
    if four_bit:
        raise MergeError(
            f"{four_bit[0]} has a 4-bit base; merging in place would re-quantize it. Use merge_and_export to "
            "write a merged 16-bit model instead"
        )
    for layer in layers.values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo ``merge_adapters`` on every merged LoRA layer."""
    for layer in lora_layers(model).values():
        if layer.merged_adapter is not None:
            layer.unmerge()


def lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights, keyed ``base_model.model.<path>.lora_{A,B}.weight`` and, for DoRA,
    ``<path>.lora_magnitude_vector`` (PEFT's saved names; detached copies)."""
    state: dict[str, torch.Tensor] = {}
    for path, layer in _check_known(model, name).items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight.detach().clone()  # (r, in)
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight.detach().clone()  # (out, r)
        if name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[name].weight
            state[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = magnitude.detach().clone()  # (out,)
    return state


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name (after ``add_lora``: the active adapter's A and B)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts its original ``out * in`` elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.qweight.numel for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total
