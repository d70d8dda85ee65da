"""Several PEFT adapters on one 4-bit base, chosen per request.

``--adapter name=dir`` loads ``dir`` under ``name``; ``--adapter dir`` names it after the directory. All
adapters live side by side in the ``LoraLinear`` layers (one copy of the base); a request picks one with
``use_adapter(model, name)`` — ``None`` runs the base alone (adapters disabled, none forgotten). Since only
the active adapter's ``A``/``B`` enter the forward, a model with adapters X and Y, X active, computes what
a model loaded with X alone computes.

An adapter made for another base fails here, before any generation, with a ``StateDictError``: its
``base_model_name_or_path`` names another model, or (checked by ``lora.load_adapter`` before it changes
anything) a module it adapts does not exist or a LoRA matrix does not fit the layer's shape.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorakit.errors import ConfigError, StateDictError
from qlorakit.lora import (
    ADAPTER_CONFIG,
    check_adapter_dir,
    load_adapter,
    set_active_adapter,
    set_adapters_enabled,
)

#: The request-time name of "no adapter" (base model only).
BASE_ONLY = "base"

_QUANT_TAG = re.compile(r"[.-](q\d\w*|f16|f32|bf16|fp16|gguf)$", re.IGNORECASE)


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter`` value: the adapter's name and its directory."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """``"name=dir"`` or ``"dir"`` (named after the directory's basename)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text.rstrip("/")).name, text
        if not name or not path:
            raise ConfigError(f"--adapter {text!r}: expected NAME=DIR or DIR")
        if name == BASE_ONLY or "." in name:
            raise ConfigError(f"--adapter {text!r}: the name {name!r} is reserved or contains '.'; pick another NAME=")
        return cls(name, Path(path))


def model_key(name: str) -> str:
    """A comparable model name: the last path component, lower case, without a ``.gguf``/quant suffix."""
    key = Path(str(name).rstrip("/")).name.lower()
    while True:
        stripped = _QUANT_TAG.sub("", key)
        if stripped == key:
            return key
        key = stripped


def check_base_name(spec: AdapterSpec, base_names: list[str]) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` names none of ``base_names`` (when both are known)."""
    config_file = check_adapter_dir(spec.path) / ADAPTER_CONFIG
    try:
        declared = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_file}: invalid JSON ({exc})") from exc
    keys = {model_key(n) for n in base_names if n}
    if declared and keys and model_key(declared) not in keys:
        raise StateDictError(
            f"{config_file}: base_model_name_or_path is {declared!r}, but the loaded base is "
            f"{sorted(n for n in base_names if n)}; this adapter was trained for another base model. Load it "
            "with its own base, or pass --allow-other-base if the two names are the same model"
        )


def load_adapters(
    model: Any, specs: list[AdapterSpec], base_names: list[str], allow_other_base: bool = False
) -> list[str]:
    """Load every adapter under its name (each checked before the model changes); return the names."""
    names = [s.name for s in specs]
    duplicate = {n for n in names if names.count(n) > 1}
    if duplicate:
        raise ConfigError(f"--adapter names must be unique; {sorted(duplicate)} given twice (use NAME=DIR)")
    for spec in specs:
        if not allow_other_base:
            check_base_name(spec, base_names)
        load_adapter(model, spec.path, name=spec.name)
    return names


def use_adapter(model: Any, name: str | None) -> None:
    """Make adapter ``name`` the one every request uses; ``None`` or ``"base"``: base model only."""
    if name is None or name == BASE_ONLY:
        set_adapters_enabled(model, False)
        return
    set_active_adapter(model, name)
    set_adapters_enabled(model, True)
