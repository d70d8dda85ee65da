"""GGUF input: a transformers config from the metadata, and the tensors under their Hugging Face names.

This follows transformers' GGUF loader (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``, the path
``from_pretrained(dir, gguf_file=...)`` takes for llama-family files) piece by piece, so the numbers
are the same as its own:

- config: metadata keys renamed through ``transformers.integrations.GGUF_CONFIG_MAPPING``; the LM head
  is tied when the file has no ``output.weight``; ``vocab_size`` falls back to the vocabulary length.
  A renamed hyperparameter that is not a number, or a block count above the file's ``blk.<i>``
  tensor groups, is refused (``ModelLoadError`` naming the key).
  For architectures whose config needs more than renaming, ``load_gguf_checkpoint(return_tensors=False)``
  itself is called (slower: it parses the whole vocabulary).
- tensors: each is dequantized to fp32 with ``gguf.quants.dequantize``, passed through the
  architecture's ``TensorProcessor`` (llama's un-permutes the rotary halves of q/k) and renamed with
  ``get_gguf_hf_weights_map``. Unlike ``load_gguf_checkpoint(return_tensors=True)``, which holds every
  dequantized tensor at once, they are yielded one by one for the caller to quantize as they come.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from qlorakit.errors import ModelLoadError
from qlorakit.models.gguf_reader import GgufHeader, read_tensor_bytes

#: GGUF architectures whose transformers config is a plain renaming of metadata keys.
RENAME_ONLY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "starcoder2", "gemma2")
#: Config fields renamed from GGUF metadata that are text; every other one is a number.
_TEXT_FIELDS = ("model_type", "_model_name_or_path")
_BLOCK = re.compile(r"blk\.(\d+)\.")


def gguf_config_dict(header: GgufHeader) -> dict[str, Any]:
    """The config dict transformers builds for this file (``model_type`` included)."""
    arch = header.architecture
    name = header.metadata.get("general.name")
    updated = "mistral" if "llama" in arch and name == "mistral" else arch
    if arch not in RENAME_ONLY_ARCHS or updated not in RENAME_ONLY_ARCHS:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            return dict(load_gguf_checkpoint(str(header.path), return_tensors=False)["config"])
        except Exception as exc:  # gguf.GGUFReader's failures on a corrupt file are of many types
            raise ModelLoadError(f"{header.path}: transformers cannot read GGUF architecture {arch!r} (key "
                                 f"'general.architecture'): {type(exc).__name__}: {exc}") from exc
    from transformers.integrations import (
        GGUF_CONFIG_DEFAULTS_MAPPING,
        GGUF_CONFIG_MAPPING,
    )

    config: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in header.tensors)}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, {}).items():
        config.setdefault(key, value)
    for key, value in header.metadata.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is None or renamed == -1:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if renamed not in _TEXT_FIELDS and not _is_number(value):
            raise ModelLoadError(f"{header.path}: key {key!r} = {value!r:.80} is not a number (transformers' "
                                 f"{renamed}); the file is corrupt")
        config[renamed] = value.replace(arch, updated) if isinstance(value, str) and arch in value else value
    if "vocab_size" not in config and isinstance(header.metadata.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = header.metadata["tokenizer.ggml.tokens"]
    _check_block_count(header, config.get("num_hidden_layers"), f"{arch}.block_count")
    return config


def _is_number(value: Any) -> bool:
    """An int or finite float, or a list of them (per-layer values)."""
    if isinstance(value, list):
        return all(_is_number(v) and not isinstance(v, list) for v in value)
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _check_block_count(header: GgufHeader, layers: Any, key: str) -> None:
    """The block count must not exceed the ``blk.<i>.`` tensor groups of the file (a corrupt count would
    make the model builder loop over billions of layers)."""
    blocks = {match[1] for t in header.tensors if (match := _BLOCK.match(t.name))}
    if isinstance(layers, int) and layers > len(blocks):
        raise ModelLoadError(f"{header.path}: key {key!r} = {layers}, but the file holds tensors of {len(blocks)} "
                             "blocks (blk.<i>.*); the file is corrupt or truncated")


def gguf_config(header: GgufHeader) -> Any:
    """The ``transformers.PretrainedConfig`` of the file."""
    from transformers import CONFIG_MAPPING

    config = gguf_config_dict(header)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{header.path}: transformers has no config class for GGUF model type {model_type!r}")
    return config_from_dict(header, CONFIG_MAPPING[model_type], config)


def config_from_dict(header: GgufHeader, config_class: Any, config: dict[str, Any]) -> Any:
    """``config_class.from_dict(config)``; transformers' validation of a corrupt value becomes ModelLoadError."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return config_class.from_dict(config)
    except (StrictDataclassError, TypeError, ValueError) as exc:
        why = " ".join(str(exc).split())
        raise ModelLoadError(f"{header.path}: transformers refuses the config built from the metadata: {why}") from exc


def check_tensor_types(header: GgufHeader) -> None:
    """Fail before loading when a tensor's type cannot be dequantized by the ``gguf`` package."""
    import gguf

    for ggml_type in sorted({t.ggml_type for t in header.tensors}):
        qtype = gguf.GGMLQuantizationType(ggml_type)
        _block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            names = [t.name for t in header.tensors if t.ggml_type == ggml_type]
            raise ModelLoadError(
                f"{header.path}: tensor type {qtype.name} (used by {len(names)} tensor(s), e.g. {names[0]!r}) "
                f"cannot be dequantized; re-convert the model to a supported type such as Q8_0, Q4_K or F16"
            ) from None


class _Names:
    """What ``get_gguf_hf_weights_map`` reads of a model: its config and state-dict names, no children."""

    def __init__(self, config: Any, names: list[str]) -> None:
        self.config, self._names = config, names

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> tuple:
        return ()


def _weights_map(model: nn.Module, processor: Any, weights_map: Any) -> dict[str, str]:
    """``{gguf name: hf name}``: transformers' ``get_gguf_hf_weights_map`` for the whole model, then for
    names relative to each top-level child (a GGUF converted from e.g. ``BloomModel``).

    transformers recurses into every submodule and rebuilds gguf's name table at each (~35 ms x ~400
    modules for a 30-layer model); two levels give the same map for decoder LMs in a fraction of that.
    Built from the unpatched model: the names of plain ``nn.Linear`` / ``nn.Embedding`` weights.
    """
    names = list(model.state_dict(keep_vars=True))
    mapping = weights_map(_Names(model.config, names), processor)
    for child, _ in model.named_children():
        inner = [n[len(child) + 1 :] for n in names if n.startswith(child + ".")]
        sub = weights_map(_Names(model.config, inner), processor, qual_name=f"{child}.")
        mapping.update({k: v for k, v in sub.items() if k not in mapping})
    return mapping


class GgufTensorStream:
    """Yields ``(hf_name, fp32 tensor)`` for a model built from ``gguf_config(header)``."""

    def __init__(self, header: GgufHeader, model: nn.Module, config_dict: dict[str, Any]) -> None:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.header = header
        self.config_dict = config_dict
        self.processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config_dict)
        try:
            self.name_map = _weights_map(model, self.processor, get_gguf_hf_weights_map)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{header.path}: the gguf package has no tensor names for this model ({exc})") from exc

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        import gguf

        with open(self.header.path, "rb") as f:
            for info in self.header.tensors:
                raw = read_tensor_bytes(f, self.header, info)  # uint8 (rows, bytes per row)
                weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))  # fp32 info.shape
                parsed: dict[str, Any] = {"config": self.config_dict, "tensors": {}}
                result = self.processor.process(
                    weights=weights.reshape(info.shape),
                    name=info.name,
                    tensor_key_mapping=self.name_map,
                    parsed_parameters=parsed,
                )
                extra = list(parsed["tensors"].items())  # processors that split one tensor into several
                if result.name in self.name_map:
                    extra.append((self.name_map[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))))
                del raw, weights, result, parsed  # only the yielded tensors stay alive while the caller converts them
                while extra:
                    yield extra.pop(0)
