"""The models a request may name: the base (under its id and ``"base"``) and every loaded adapter.

Lookups come from the HTTP threads; loading and deleting run on the engine's thread between decoding
steps (``Engine.call``), since they change the model's layers. An adapter is checked before the model
changes: ``lora.check_adapter_dir`` (the two files), its declared base (``generate.adapters.check_base_name``),
then ``lora.load_adapter`` checks every layer and shape before it adds anything. A deleted adapter
disappears from lookups at once; its weights go when no request uses it any more (``Engine``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from qlorakit.errors import ConfigError
from qlorakit.generate.adapters import BASE_ONLY, AdapterSpec, check_base_name
from qlorakit.lora import check_adapter_dir, delete_adapter, load_adapter


class UnknownModelError(ConfigError):
    """A request named a model that is neither the base nor a loaded adapter."""


class AdapterRegistry:
    """Names -> adapters (``None`` for the base); thread-safe reads, writes on the engine thread."""

    def __init__(self, model: Any, base_id: str, base_names: list[str], allow_other_base: bool = False) -> None:
        self.model = model
        self.base_id = base_id
        self.base_names = base_names
        self.allow_other_base = allow_other_base
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}

    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def resolve(self, model_name: str) -> str | None:
        """The adapter a request's ``model`` names (``None``: the base), or ``UnknownModelError``."""
        if model_name in (self.base_id, BASE_ONLY):
            return None
        with self._lock:
            if model_name in self._paths:
                return model_name
            known = [self.base_id, *self._paths]
        raise UnknownModelError(f"The model '{model_name}' does not exist; loaded models: {known}")

    def check(self, name: str, path: str | Path) -> AdapterSpec:
        """The cheap checks, before the engine thread loads anything: name free, files present, same base."""
        if name in (self.base_id, BASE_ONLY):
            raise ConfigError(f"adapter name {name!r} is the base model's; pick another name")
        with self._lock:
            if name in self._paths:
                raise ConfigError(f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first")
        spec = AdapterSpec(name, check_adapter_dir(path))
        if not self.allow_other_base:
            check_base_name(spec, self.base_names)
        return spec

    def load(self, spec: AdapterSpec) -> list[str]:
        """Engine thread only: add the adapter to the model (every layer and shape checked first)."""
        paths = load_adapter(self.model, spec.path, name=spec.name)
        self.model.eval()
        with self._lock:
            self._paths[spec.name] = spec.path
        return paths

    def forget(self, name: str) -> None:
        """Remove ``name`` from lookups (its weights stay until ``unload``)."""
        with self._lock:
            if name not in self._paths:
                raise UnknownModelError(f"no adapter '{name}' is loaded; loaded: {list(self._paths)}")
            del self._paths[name]

    def unload(self, name: str) -> None:
        """Engine thread only: delete the adapter's weights from the model."""
        delete_adapter(self.model, name)
