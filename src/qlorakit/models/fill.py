"""Putting streamed checkpoint tensors into an empty model skeleton, one tensor at a time.

Each incoming ``(name, tensor)`` is moved to the target device and then:

- the weight of a ``Linear4bit`` shell is quantized right away (``quantize_chunked``, bit-identical to
  ``quantize_4bit`` with bounded temporaries) and dropped;
- a bitsandbytes 4-bit weight (``L.weight`` + ``L.weight.absmax`` / ``quant_map`` / ``nested_*`` /
  ``quant_state.bitsandbytes__<type>``) is gathered until its pieces are complete, then loaded as saved
  through ``Linear4bit``'s state-dict hook — or, into a plain ``nn.Linear``, dequantized;
- any other tensor replaces its meta placeholder: normalization parameters in fp32, other floating
  tensors in the compute dtype, integer tensors unchanged.

Only the tensor in hand (plus, for a 4-bit layer, its few pieces) is alive besides the model itself.

``FillHooks`` lets a caller take part without this package knowing why (``parallel.fsdp_load`` uses it to
load one rank's shard of each 4-bit linear, or to have rank 0 load and send): ``tensors`` may replace the
stream, ``placed`` sees each tensor put in place, ``filled`` each ``Linear4bit`` once its weight is whole
(it may re-home the weight, e.g. keep only some rows of it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.errors import ModelLoadError, QlorakitError
from qlorakit.models.build import is_pending
from qlorakit.models.chunked import quantize_chunked
from qlorakit.models.memory import TRIM_NUMEL, trim_heap
from qlorakit.models.meta import meta_tensor_names, set_tensor, split_name, tensor_names
from qlorakit.quant.functional import dequantize_4bit
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

_BNB_STATE = ".weight.quant_state.bitsandbytes__"


def prequantized_layers(checkpoint_names: Iterable[str]) -> dict[str, set[str]]:
    """``{layer path: its checkpoint keys}`` for every layer saved in bitsandbytes' 4-bit layout."""
    names = list(checkpoint_names)
    layers = {n[: n.index(_BNB_STATE)] for n in names if _BNB_STATE in n}
    return {layer: {n for n in names if n == f"{layer}.weight" or n.startswith(f"{layer}.weight.")} for layer in layers}


class FillHooks(Protocol):
    """What a ``Filler`` calls besides its own work (see the module docstring); ``NO_HOOKS`` does nothing."""

    def tensors(self, model: nn.Module, stream: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterable[tuple[str, torch.Tensor]]: ...

    def placed(self, name: str, tensor: torch.Tensor) -> None: ...

    def filled(self, path: str, module: Linear4bit) -> None: ...


class _NoHooks:
    def tensors(self, model, stream):
        return stream

    def placed(self, name, tensor) -> None:
        pass

    def filled(self, path, module) -> None:
        pass


NO_HOOKS: FillHooks = _NoHooks()


@dataclass
class Filler:
    """Fills ``model`` from a tensor stream; see the module docstring."""

    model: nn.Module
    device: torch.device
    compute_dtype: torch.dtype
    quant: QuantConfig | None
    fp32_names: set[str]
    bnb_layers: dict[str, set[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    hooks: FillHooks = NO_HOOKS
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._known = tensor_names(self.model)
        self._modules = dict(self.model.named_modules())
        self._bnb_key_owner = {key: layer for layer, keys in self.bnb_layers.items() for key in keys}

    def fill(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in self.hooks.tensors(self.model, tensors):
            numel = tensor.numel()
            self.put(name, tensor)
            del tensor
            if numel >= TRIM_NUMEL:
                trim_heap()
        incomplete = sorted(self._pending)
        if incomplete:
            raise ModelLoadError(
                f"4-bit layers with incomplete quantization state in the checkpoint: {incomplete[:10]}"
            )
        if self.unexpected:
            logger.warning(
                "ignored %d checkpoint tensor(s) the model has no place for: %s",
                len(self.unexpected),
                self.unexpected[:10],
            )

    def put(self, name: str, tensor: torch.Tensor) -> None:
        layer = self._bnb_key_owner.get(name)
        if layer is not None:
            self._gather_4bit(layer, name, tensor)
            return
        module_path, leaf = split_name(name)
        module = self._modules.get(module_path)
        if isinstance(module, Linear4bit) and leaf == "weight":
            self._quantize_into(module, name, tensor)
        elif name in self._known:
            self._set(name, self._cast(name, tensor))
        else:
            self.unexpected.append(name)

    def _set(self, name: str, value: torch.Tensor) -> None:
        set_tensor(self.model, name, value)
        self.hooks.placed(name, value)

    def _dtype_for(self, name: str) -> torch.dtype:
        return torch.float32 if name in self.fp32_names else self.compute_dtype

    def _cast(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A copy on the device in the dtype for ``name`` (always a copy: a safetensors tensor maps its file)."""
        dtype = self._dtype_for(name) if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype, copy=True)

    def _quantize_into(self, module: Linear4bit, name: str, tensor: torch.Tensor) -> None:
        assert self.quant is not None  # shells exist only when quantizing
        try:
            module.qweight = quantize_chunked(tensor.to(self.device), self.quant, name=name)
        except QlorakitError as exc:
            raise ModelLoadError(f"cannot quantize {name}: {exc}") from exc
        if tuple(module.qweight.shape) != (module.out_features, module.in_features):
            raise ModelLoadError(
                f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                f"{[module.out_features, module.in_features]}; the config and the weights belong to different models"
            )
        self.hooks.filled(name.removesuffix(".weight"), module)

    def _gather_4bit(self, layer: str, name: str, tensor: torch.Tensor) -> None:
        pieces = self._pending.setdefault(layer, {})
        pieces[name[len(layer) + 1 :]] = tensor.to(self.device, copy=True)  # relative key: "weight.absmax"
        if len(pieces) == len(self.bnb_layers[layer]):
            del self._pending[layer]
            self._load_4bit(layer, pieces)

    def _load_4bit(self, layer: str, pieces: dict[str, torch.Tensor]) -> None:
        module = self._modules.get(layer)
        if module is None:
            self.unexpected += [f"{layer}.{k}" for k in pieces]
            return
        try:
            if isinstance(module, Linear4bit):
                # Linear4bit's own bitsandbytes-layout hook: packed codes and quant state used as saved.
                module.load_state_dict(pieces, strict=False)
                self.hooks.filled(layer, module)
                return
            state = {k[len("weight.") :]: v for k, v in pieces.items() if k != "weight"}
            qweight = QuantizedTensor.from_bnb_dict(pieces["weight"], state, where=f"{layer}.weight")
        except QlorakitError as exc:
            raise ModelLoadError(f"bad 4-bit state for {layer} in the checkpoint: {exc}") from exc
        if not isinstance(module, nn.Linear):
            raise ModelLoadError(
                f"checkpoint stores {layer} in 4 bits but the model's {layer} is a {type(module).__name__}"
            )
        self._set(f"{layer}.weight", dequantize_4bit(qweight, self._dtype_for(f"{layer}.weight")))


def missing_names(model: nn.Module) -> list[str]:
    """Checkpoint names that never arrived: meta parameters/buffers and weightless ``Linear4bit`` shells."""
    missing = meta_tensor_names(model)
    missing += [f"{path}.weight" for path, m in model.named_modules() if isinstance(m, Linear4bit) and is_pending(m)]
    return sorted(missing)
