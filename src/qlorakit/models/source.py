"""What a model ``source`` string points at, resolved to a ``ModelSource`` before anything is loaded.

Accepted, in the order they are tried:

1. a built-in alias (``qlorakit.models.registry.REGISTRY``, e.g. ``smollm2-135m-instruct``): fetched once
   into the user cache, then a GGUF file;
2. a local ``.gguf`` file, or a directory without ``config.json`` holding exactly one ``.gguf``;
3. a local Hugging Face directory (``config.json`` + ``model.safetensors`` or a sharded
   ``model.safetensors.index.json``); when its ``quantization_config`` says bitsandbytes 4-bit, the
   packed weights are used as saved (kind ``bnb-4bit``), otherwise the weights are floats (``safetensors``);
4. a Hub id ``org/name``: the config, safetensors and tokenizer files are fetched with
   ``huggingface_hub.snapshot_download`` into its cache, then as 3.

Anything else (a path that does not exist, a file that is neither) fails with ``ModelLoadError``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorakit.errors import ModelLoadError
from qlorakit.models import registry
from qlorakit.untrusted import check_json_depth, decode_utf8, parse_json

SAFETENSORS, BNB_4BIT, GGUF = "safetensors", "bnb-4bit", "gguf"

#: Files fetched from the Hub: enough to build, load and tokenize; never pickles.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "added_tokens.json",
]  # fmt: skip

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``kind`` (``safetensors``, ``bnb-4bit`` or ``gguf``), the local ``path`` (the
    directory, or the ``.gguf`` file) and the string it came from."""

    kind: str
    path: Path
    origin: str

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == GGUF else self.path

    def config_json(self) -> dict[str, Any]:
        """The parsed ``config.json`` of a directory source."""
        return read_config_json(self.path)


def resolve_source(
    source: str | os.PathLike,
    cache_root: Path | None = None,
    aliases: Mapping[str, registry.RegistryEntry] | None = None,
) -> ModelSource:
    """Resolve ``source`` (see the module docstring); aliases are fetched into ``cache_root`` if given."""
    origin = os.fspath(source)
    aliases = registry.REGISTRY if aliases is None else aliases
    path = Path(origin).expanduser()
    if origin in aliases and not path.exists():
        return ModelSource(GGUF, registry.fetch(aliases[origin], cache_root), origin)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a .gguf file or a model directory")
        return ModelSource(GGUF, path, origin)
    if path.is_dir():
        return _classify_directory(path, origin)
    if _HUB_ID.fullmatch(origin) and not origin.lower().endswith(".gguf"):
        return _classify_directory(download_from_hub(origin), origin)
    raise ModelLoadError(
        f"model source {origin!r} does not exist: pass a local directory with config.json, a .gguf file, "
        f"a Hub id like 'org/name', or an alias ({', '.join(sorted(aliases))})"
    )


def _classify_directory(path: Path, origin: str) -> ModelSource:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(GGUF, ggufs[0], origin)
        what = (
            f"several .gguf files {[g.name for g in ggufs]}; pass one of them"
            if ggufs
            else "no config.json and no .gguf file"
        )
        raise ModelLoadError(f"model directory {path} has {what}")
    quant = read_config_json(path).get("quantization_config")
    if quant is None:
        return ModelSource(SAFETENSORS, path, origin)
    method = quant.get("quant_method", "bitsandbytes") if isinstance(quant, dict) else None
    if method == "bitsandbytes" and (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        return ModelSource(BNB_4BIT, path, origin)
    detail = "8-bit bitsandbytes" if method == "bitsandbytes" else f"quant_method {method!r}"
    raise ModelLoadError(
        f"{path}/config.json describes a {detail} checkpoint; qlorakit loads float checkpoints and bitsandbytes "
        f"4-bit ones — pass the original float model instead"
    )


def read_config_json(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict; ``ModelLoadError`` if it is missing or not a JSON object."""
    path = directory / "config.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"{directory} has no config.json") from None
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc})") from None
    check_json_depth(raw, str(path), ModelLoadError)
    config = parse_json(decode_utf8(raw, str(path), ModelLoadError, bom=True), str(path), ModelLoadError)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return config


def download_from_hub(repo_id: str) -> Path:
    """``snapshot_download`` of the files in ``HUB_PATTERNS``; an unreachable Hub is a ``ModelLoadError``."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as exc:
        raise ModelLoadError(f"{repo_id!r} looks like a Hub id but huggingface_hub is not installed ({exc})") from exc
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelLoadError(
            f"{repo_id!r} is not a local path, and the Hub has no accessible repository of that name "
            f"({type(exc).__name__}); check the name or log in for a gated model"
        ) from exc
    except Exception as exc:  # offline, DNS, proxy, HTTP: the hub client raises many kinds
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and the Hugging Face Hub is unreachable ({type(exc).__name__}: {exc}); "
            f"download the model elsewhere and pass its local directory (config.json + *.safetensors) instead"
        ) from exc
