"""``QuantizedTensor``: one object that owns a 4-bit tensor's whole state, and its bitsandbytes layout.

A weight ``W`` of ``n`` elements quantized with block size ``B`` is stored as

- ``packed``: uint8 ``((n + 1) // 2, 1)``, two 4-bit codes per byte, the even flat index in the high nibble;
- ``absmax``: the per-block scale, fp32 ``(ceil(n / B),)`` — or, with double quantization, uint8 codes of
  ``absmax - offset`` in the signed 8-bit dynamic map, blockwise with a block of 256, whose own fp32
  scales (``nested.absmax``), map (``nested.code``) and ``offset`` live in ``nested``;
- ``code``: the 16-entry fp32 table, plus ``quant_type``, ``blocksize``, the original ``shape`` and ``dtype``.

Serialization is data: ``to_bnb_dict()`` gives exactly the tensors bitsandbytes writes for a
``Linear4bit`` weight (``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` and a uint8 tensor of
UTF-8 JSON under ``quant_state.bitsandbytes__<type>``); ``from_bnb_dict()`` reads them back and checks them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from qlorakit.constants import BLOCKSIZES, QUANT_TYPES
from qlorakit.errors import QuantizationError, StateDictError

#: Block size of the second (8-bit) quantization of the absmax values in double quantization.
NESTED_BLOCKSIZE = 256

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling in bitsandbytes' JSON)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str) -> torch.dtype:
    if name not in _DTYPES:
        raise StateDictError(f"{where}: unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class NestedState:
    """The second quantization level of double quantization (scales of the 8-bit absmax codes)."""

    absmax: torch.Tensor  # fp32 (ceil(blocks / 256),)
    code: torch.Tensor  # fp32 (256,) signed dynamic map
    offset: float  # mean of the first-level absmax, an fp32 value held exactly in a Python float
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed 4-bit codes with their scales, table and metadata. Build it with ``quantize_4bit``."""

    packed: torch.Tensor  # uint8 ((numel + 1) // 2, 1)
    absmax: torch.Tensor  # fp32 (blocks,) or uint8 (blocks,) with double quant
    code: torch.Tensor  # fp32 (16,)
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object owns."""
        out = [self.packed, self.absmax, self.code]
        if self.nested is not None:
            out += [self.nested.absmax, self.nested.code]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of storage actually held (codes, scales, tables)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same state on ``device``; dtypes never change (uint8 codes and fp32 scales stay so)."""
        nested = self.nested
        if nested is not None:
            nested = replace(nested, absmax=nested.absmax.to(device), code=nested.code.to(device))
        return replace(
            self, packed=self.packed.to(device), absmax=self.absmax.to(device), code=self.code.to(device), nested=nested
        )

    # --- the bitsandbytes state-dict layout -------------------------------------------------------

    def quant_state_json(self) -> dict:
        """The non-tensor metadata, in bitsandbytes' key order."""
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.nested is not None:
            meta.update(
                nested_blocksize=self.nested.blocksize, nested_dtype="float32", nested_offset=self.nested.offset
            )
        return meta

    def to_bnb_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed as bitsandbytes' ``QuantState.as_dict(packed=True)`` (without ``weight``)."""
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested is not None:
            out["nested_absmax"] = self.nested.absmax
            out["nested_quant_map"] = self.nested.code
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_dict(
        cls, packed: torch.Tensor, state: dict[str, torch.Tensor], where: str = "weight"
    ) -> QuantizedTensor:
        """Rebuild from the packed weight and the ``as_dict`` tensors; ``where`` names the layer in errors."""
        meta = _read_quant_state_json(state, where)
        required = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if "nested_offset" in meta else [])
        missing = [k for k in required if k not in state]
        if missing:
            raise StateDictError(f"{where}: missing quantization state {missing}")
        shape = tuple(int(s) for s in meta["shape"])
        nested = None
        if "nested_offset" in meta:
            nested = NestedState(
                absmax=state["nested_absmax"].float(),
                code=state["nested_quant_map"].float(),
                offset=float(meta["nested_offset"]),
                blocksize=int(meta["nested_blocksize"]),
            )
        q = cls(
            packed=packed.view(torch.uint8).reshape(-1, 1),
            absmax=state["absmax"],
            code=state["quant_map"].float(),
            quant_type=str(meta["quant_type"]),
            blocksize=int(meta["blocksize"]),
            shape=shape,
            dtype=dtype_from_name(str(meta["dtype"]), where),
            nested=nested,
        )
        q.check(where)
        return q

    def check(self, where: str = "weight") -> None:
        """Raise ``StateDictError`` unless every tensor has the size the metadata implies."""
        try:
            check_format(self.quant_type, self.blocksize)
        except QuantizationError as exc:
            raise StateDictError(f"{where}: {exc}") from exc
        expect = {
            "packed": (self.packed, ((self.numel + 1) // 2, 1)),
            "absmax": (self.absmax, (self.num_blocks,)),
            "quant_map": (self.code, (16,)),
        }
        if self.nested is not None:
            nested_blocks = -(-self.num_blocks // self.nested.blocksize)
            expect["nested_absmax"] = (self.nested.absmax, (nested_blocks,))
            expect["nested_quant_map"] = (self.nested.code, (256,))
        for name, (tensor, shape) in expect.items():
            if tuple(tensor.shape) != shape:
                raise StateDictError(
                    f"{where}.{name}: shape {tuple(tensor.shape)} does not match {shape} implied by the quant_state "
                    f"(shape={list(self.shape)}, blocksize={self.blocksize})"
                )
        want_absmax = torch.uint8 if self.nested is not None else torch.float32
        if self.absmax.dtype != want_absmax:
            raise StateDictError(f"{where}.absmax: dtype {self.absmax.dtype}, expected {want_absmax}")


def check_format(quant_type: str, blocksize: int) -> None:
    """Raise ``QuantizationError`` for an unknown quant type or a block size outside ``BLOCKSIZES``."""
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize!r} not supported; use a power of two in 32..4096 ({BLOCKSIZES})")


def _read_quant_state_json(state: dict[str, torch.Tensor], where: str) -> dict:
    keys = [k for k in state if k.startswith("quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise StateDictError(f"{where}: expected exactly one 'quant_state.bitsandbytes__<type>' entry, found {keys}")
    try:
        meta = json.loads(bytes(state[keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateDictError(f"{where}.{keys[0]}: not valid UTF-8 JSON ({exc})") from exc
    need = {"quant_type", "blocksize", "dtype", "shape"}
    if not isinstance(meta, dict) or not need <= set(meta):
        raise StateDictError(f"{where}.{keys[0]}: JSON must hold {sorted(need)}, got {meta!r}")
    if keys[0].rsplit("__", 1)[1] != meta["quant_type"]:
        raise StateDictError(f"{where}: key {keys[0]} disagrees with quant_type {meta['quant_type']!r} in its JSON")
    return meta
