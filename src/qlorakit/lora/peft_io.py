"""Save and load adapters in PEFT's on-disk layout, so ``peft.PeftModel.from_pretrained`` reads ours unchanged.

A directory holds two files:

- ``adapter_config.json``: a PEFT ``LoraConfig`` (``peft_type`` "LORA", ``task_type`` "CAUSAL_LM", ``r``,
  ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules``, ...). ``target_modules`` is written
  so that PEFT selects exactly the layers that carry the adapter: the user's regex, else the sorted short
  names (PEFT matches a name ``t`` to a module path equal to ``t`` or ending in ``".t"``), else a regex of
  the escaped full paths (PEFT ``re.fullmatch``-es a string against each module path).
- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r, in) and
  ``.lora_B.weight`` (out, r), and for a DoRA adapter (``use_dora: true``) ``.lora_magnitude_vector`` (out,).
  PEFT removes the adapter name from keys when saving; loading here also
  accepts keys that still carry it (``lora_A.<name>.weight``) and keys without the ``base_model.model.``
  prefix. Pickle files (``adapter_model.bin``) are never read.

Saving writes into a temporary directory next to the target and renames it into place, so a crash never
leaves a half-written adapter. Loading checks every layer and shape before it touches the model, and
reads hostile files safely: ``adapter_config.json`` must be UTF-8 JSON whose fields have PEFT's types
(each error names the key), the weights' safetensors header is validated (``qlorakit.untrusted``)
before the tensors are loaded, and LoRA weights must be floating point. Adapter names are plain names
(no path separator, ``..``, NUL or absolute path), as PEFT makes ``<dir>/<name>/`` of a named adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError, StateDictError
from qlorakit.fileio import write_dir_atomic
from qlorakit.lora.layer import LoraLinear, MergeError
from qlorakit.lora.model import (
    PEFT_PREFIX,
    add_lora_at,
    base_module_names,
    delete_adapter,
    lora_layers,
    lora_state_dict,
    set_active_adapter,
)
from qlorakit.lora.targets import is_linear
from qlorakit.untrusted import check_file_name, decode_utf8, parse_json, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: PEFT options qlorakit cannot reproduce: each must be absent or equal to the value given here.
_UNSUPPORTED_PEFT_OPTIONS: dict[str, Any] = {
    "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False, "bias": "none",
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "layers_to_transform": None,
}
#: PEFT initialisations that rewrite the base weights (the adapter is tied to the rewritten base).
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
#: safetensors dtypes a LoRA weight may have.
_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
#: DoRA's magnitude: PEFT saves ``<path>.lora_magnitude_vector``; older files and unsaved state dicts carry the
#: adapter name and / or ``.weight`` after it.
_MAGNITUDE_KEY = re.compile(r"(?P<path>.+)\.lora_magnitude_vector(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?")


# --- saving ----------------------------------------------------------------------------------------


def _peft_selects(modules: list[str], target: str | list[str]) -> set[str]:
    """The module paths PEFT's ``check_target_module_exists`` would pick for ``target_modules``."""
    if isinstance(target, str):
        return {m for m in modules if re.fullmatch(target, m)}
    return {m for m in modules if m in target or any(m.endswith("." + t) for t in target)}


def peft_target_modules(model: nn.Module, paths: list[str], config: LoraConfig) -> str | list[str]:
    """A ``target_modules`` value under which PEFT adapts exactly ``paths`` of ``model``."""
    modules = [m for m in base_module_names(model) if m]
    candidates: list[str | list[str]] = []
    if isinstance(config.targets, str) and config.targets.startswith("re:"):
        candidates.append(config.targets[3:])
    candidates.append(sorted({p.rsplit(".", 1)[-1] for p in paths}))
    for candidate in candidates:
        if _peft_selects(modules, candidate) == set(paths):
            return candidate
    return "|".join(re.escape(p) for p in paths)


def peft_config_dict(config: LoraConfig, target_modules: str | list[str], base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` content for ``config`` (the fields PEFT 0.21's LoraConfig reads)."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": config.r, "lora_alpha": alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "target_modules": target_modules, "exclude_modules": None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": config.dora,
        "lora_bias": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "layer_replication": None, "auto_mapping": None,
    }


def _default_adapter(model: nn.Module) -> str:
    active = {m.active_adapter for m in lora_layers(model).values()} - {None}
    every = {n for m in lora_layers(model).values() for n in m.adapter_names}
    if len(active) == 1:
        return active.pop()
    if not active and len(every) == 1:
        return every.pop()
    raise ConfigError(f"pass name=...: the model has adapters {sorted(every)} and no single active one")


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory`` in PEFT's layout; return the path.

    An existing non-empty ``directory`` is refused unless ``overwrite=True``, which replaces it whole.
    ``base_model_name_or_path`` defaults to ``model.config.name_or_path`` when the model has one.
    """
    target = Path(directory)
    name = _default_adapter(model) if name is None else check_file_name(name, "adapter name", ConfigError)
    state = lora_state_dict(model, name)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a directory; choose another adapter directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} is not empty; pass overwrite=True to replace it, or choose another directory")
    layers = {p: m for p, m in lora_layers(model).items() if name in m.lora_A}
    config = next(iter(layers.values())).configs[name]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    content = peft_config_dict(config, peft_target_modules(model, list(layers), config), base_model_name_or_path)

    def fill(staged: Path) -> None:
        (staged / ADAPTER_CONFIG).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(staged / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})

    # .<name>.tmp-<pid> staging, fsync, rename, fsync of the parent; what a killed save leaves is removed by
    # fileio.remove_stale at the next start (docs/reliability.md)
    write_dir_atomic(target, fill)
    return target


# --- loading ---------------------------------------------------------------------------------------


def _field(values: dict[str, Any], key: str, default: Any, kinds: tuple[type, ...], where: str, need: str,
           valid: Callable[[Any], bool] = lambda v: True) -> Any:
    """``values[key]`` (``default`` when absent or null) if it is one of ``kinds`` (a bool only where listed,
    a finite float) and ``valid``; else ConfigError naming the key."""
    value = values.get(key)
    if value is None:
        return default
    kind_ok = (bool in kinds) if isinstance(value, bool) else isinstance(value, kinds)
    finite = not isinstance(value, float) or math.isfinite(value)
    if not (kind_ok and finite and valid(value)):
        raise ConfigError(f"{where}: key '{key}' = {value!r:.80}: expected {need}")
    return value


def _peft_targets(values: dict[str, Any], where: str) -> str | tuple[str, ...] | None:
    """``target_modules``: a regex string (PEFT fullmatch), "all-linear", or a list of module names."""
    targets = values.get("target_modules")
    if isinstance(targets, str):
        return targets if targets == "all-linear" else "re:" + targets
    if targets is None:
        return None
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{where}: key 'target_modules' = {targets!r:.80}: expected a string or a list of "
                          "module names")
    return tuple(sorted(targets))


def lora_config_from_peft(values: dict[str, Any], where: str = ADAPTER_CONFIG) -> LoraConfig:
    """Our ``LoraConfig`` (init "zeros", for loading) from a PEFT ``adapter_config.json`` mapping.

    Every field is type-checked first, so a hostile file fails with ``ConfigError`` naming the key.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a JSON object (PEFT's LoraConfig), got {type(values).__name__}")
    if values.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type = {values.get('peft_type')!r:.80} is not supported; only 'LORA' "
                          "adapters load")
    for key, allowed in _UNSUPPORTED_PEFT_OPTIONS.items():
        if values.get(key, allowed) not in (allowed, None, {}, []):
            raise ConfigError(f"{where}: {key} = {values[key]!r:.80} is not supported by qlorakit (needs {allowed!r})")
    init = _field(values, "init_lora_weights", True, (bool, str), where, "true, false or a PEFT init name")
    if isinstance(init, str) and init.split("_")[0] in _BASE_CHANGING_INITS:
        raise ConfigError(
            f"{where}: init_lora_weights = {init!r} changes the base weights, so this adapter only works on "
            "that modified base; convert it to a plain LoRA adapter with peft first"
        )
    targets = _peft_targets(values, where)
    r = _field(values, "r", 8, (int,), where, "a positive integer rank", lambda v: v > 0)
    alpha = _field(values, "lora_alpha", 8, (int, float), where, "a positive number", lambda v: v > 0)
    dropout = _field(values, "lora_dropout", 0.0, (int, float), where, "a number in [0, 1)", lambda v: 0 <= v < 1)
    rslora = _field(values, "use_rslora", False, (bool,), where, "true or false")
    dora = _field(values, "use_dora", False, (bool,), where, "true or false")
    try:
        return LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=targets or "all-linear", rslora=rslora,
                          init="zeros", dora=dora)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_adapter_dir(directory: str | os.PathLike[str]) -> Path:
    """``directory`` as a Path if it holds a PEFT adapter's two files (cheap: run it before loading a model)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"adapter directory {directory} does not exist")
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            pickled = " (found adapter_model.bin: qlorakit never loads pickle; re-save with safetensors)"
            hint = pickled if file == ADAPTER_WEIGHTS and (directory / "adapter_model.bin").exists() else ""
            raise StateDictError(f"{directory}: missing {file}; not a PEFT adapter directory{hint}")
    return directory


def _read_files(directory: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The parsed ``adapter_config.json`` and the tensors, the weights' header validated before loading."""
    check_adapter_dir(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    values = parse_json(decode_utf8(config_file.read_bytes(), str(config_file), ConfigError, bom=True),
                        str(config_file), ConfigError)
    header = read_safetensors_header(weights_file, StateDictError)
    not_float = next(((n, e.dtype) for n, e in header.items() if e.dtype not in _WEIGHT_DTYPES), None)
    if not_float:
        raise StateDictError(f"{weights_file}: tensor {not_float[0][:80]!r} has dtype {not_float[1]}; LoRA weights "
                             f"are one of {', '.join(_WEIGHT_DTYPES)}")
    try:
        return values, load_file(str(weights_file))
    except SafetensorError as exc:  # the header passed our checks; the library found something else
        raise StateDictError(f"corrupt safetensors file {weights_file}: {exc}") from exc


def _group_by_layer(tensors: dict[str, torch.Tensor], where: str,
                    dora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": (r, in), "B": (out, r)[, "M": (out,)]}}`` from PEFT keys, with or without adapter
    names; ``M`` (DoRA's magnitude) is required on every layer when ``dora`` and refused otherwise."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    names: dict[str, str] = {}  # adapter name in the keys -> first key carrying it
    for key, tensor in tensors.items():
        short = key.removeprefix(PEFT_PREFIX)
        match = _KEY.fullmatch(short) or _MAGNITUDE_KEY.fullmatch(short)
        if match is None:
            raise StateDictError(f"{where}: key {key!r} is not a LoRA A/B weight or a DoRA lora_magnitude_vector")
        which = match["which"] if match.re is _KEY else "M"
        if which == "M" and not dora:
            raise StateDictError(f"{where}: key {key!r} is a DoRA magnitude but adapter_config.json has no "
                                 "use_dora: true")
        if match["adapter"] is not None:
            names.setdefault(match["adapter"], key)
        layers.setdefault(match["path"], {})[which] = tensor
    if len(names) > 1:
        raise StateDictError(f"{where}: keys carry several adapter names {sorted(names)} (e.g. key "
                             f"{list(names.values())[1]!r}); expected one adapter")
    for path, pair in layers.items():
        missing = sorted({"A", "B"} - set(pair))
        if missing:
            raise StateDictError(f"{where}: {path} has no lora_{missing[0]} weight (tensor "
                                 f"{PEFT_PREFIX}{path}.lora_{missing[0]}.weight is missing)")
        if dora and "M" not in pair:
            raise StateDictError(f"{where}: {path} has no DoRA magnitude (tensor {PEFT_PREFIX}{path}."
                                 "lora_magnitude_vector is missing) although adapter_config.json has use_dora: true")
    if not layers:
        raise StateDictError(f"{where}: the file holds no LoRA weights")
    return layers


def _check_fits(model: nn.Module, layers: dict[str, dict[str, torch.Tensor]], r: int, where: str) -> list[str]:
    """The adapted paths in model order, after checking each exists and each shape fits; nothing is changed."""
    modules = base_module_names(model)
    missing = [p for p in layers if p not in modules]
    if missing:
        raise StateDictError(
            f"{where}: adapter layer {missing[0]!r} does not exist in this model ({len(missing)} of "
            f"{len(layers)} adapter layers missing); the adapter was made for another base model"
        )
    for path in layers:
        if not is_linear(modules[path]):
            kind = type(modules[path]).__name__
            raise StateDictError(f"{where}: adapter layer {path!r} is a {kind} in this model, not a linear layer")
    ordered = [p for p in modules if p in layers]
    for path in ordered:
        module = modules[path]
        expected = {"A": (r, module.in_features), "B": (module.out_features, r), "M": (module.out_features,)}
        for which in layers[path]:
            got = tuple(layers[path][which].shape)
            if got != expected[which]:
                key = "lora_magnitude_vector" if which == "M" else f"lora_{which}.weight"
                raise StateDictError(
                    f"{where}: tensor {PEFT_PREFIX}{path}.{key} has shape {list(got)} but this model "
                    f"expects {list(expected[which])} (r={r}, in_features={module.in_features}, "
                    f"out_features={module.out_features}); the adapter was made for another base model"
                )
    return ordered


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, name: str = "default", replace: bool = False
) -> list[str]:
    """Load a PEFT-layout adapter as adapter ``name`` (made active); return the adapted module paths.

    Every layer and shape is checked before the model is modified; the adapter's dtype is fp32. An existing
    adapter ``name`` is refused unless ``replace=True``: then, on the same layers with the same rank, its
    parameters are overwritten in place (an optimizer holding them stays valid, as resuming needs);
    otherwise it is deleted and added again.
    """
    directory = Path(directory)
    check_file_name(name, "adapter name", ConfigError)
    values, tensors = _read_files(directory)
    config = lora_config_from_peft(values, where=str(directory / ADAPTER_CONFIG))
    layers = _group_by_layer(tensors, where=str(directory / ADAPTER_WEIGHTS), dora=config.dora)
    paths = _check_fits(model, layers, config.r, where=str(directory))
    existing = {p: m for p, m in lora_layers(model).items() if name in m.lora_A}
    if existing and not replace:
        raise ConfigError(
            f"adapter {name!r} already exists on {next(iter(existing))}; delete it, pass replace=True, "
            "or load it under another name"
        )
    merged = [p for p, m in existing.items() if m.merged_adapter == name]
    if merged:
        raise MergeError(f"adapter {name!r} is merged into {merged[0]}; unmerge it before replacing it")
    in_place = list(existing) == paths and all((m.configs[name].r, m.configs[name].dora) == (config.r, config.dora)
                                               for m in existing.values())
    if in_place:
        for layer in existing.values():
            layer.update_config(name, config)
        set_active_adapter(model, name)
    else:
        if existing:
            delete_adapter(model, name)
        add_lora_at(model, paths, config, name)
    with torch.no_grad():
        for path in paths:
            layer: LoraLinear = model.get_submodule(path)
            layer.lora_A[name].weight.copy_(layers[path]["A"])
            layer.lora_B[name].weight.copy_(layers[path]["B"])
            if config.dora:
                layer.lora_magnitude_vector[name].weight.copy_(layers[path]["M"])
    return paths
