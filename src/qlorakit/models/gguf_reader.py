"""Reading a GGUF file's header: metadata, the tensor table and where each tensor's bytes lie.

Layout (GGUF v2/v3, little-endian): ``b"GGUF"``, version u32, tensor count u64, metadata count u64; the
metadata as ``key: string, type: u32, value``; then per tensor ``name, n_dims: u32, dims: u64[n]``
(innermost first), ``ggml type: u32, offset: u64``; the data section starts at the next multiple of
``general.alignment`` (default 32). Strings are ``u64 length + UTF-8 bytes``.

Only the header is parsed, and string arrays (the 49k-entry vocabulary of a tokenizer) are skipped and
stored as their length: this takes milliseconds, where ``gguf.GGUFReader`` builds a numpy view per
vocabulary entry. Tensor bytes are read on demand with plain file reads (``read_tensor_bytes``) so only
the tensor being read is resident. Sizes of block-quantized types come from ``gguf.GGML_QUANT_SIZES``.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qlorakit.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor of the file: GGUF name, torch-order shape, ggml type id, byte offset and size."""

    name: str
    shape: tuple[int, ...]  # torch order (outermost first)
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"unknown({self.ggml_type})"

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """Shape of the stored bytes as ``gguf.quants.dequantize`` takes them: rows x bytes per row."""
        return (*self.shape[:-1], self.nbytes // max(1, math.prod(self.shape[:-1])))


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata (string arrays replaced by their length) and tensor table."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GgufTensorInfo, ...]
    data_start: int

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse the header of ``path``; a malformed or truncated file raises ``ModelLoadError`` naming it."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            return _parse(path, blob)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); it may be truncated or corrupt") from exc


def _parse(path: Path, blob: mmap.mmap) -> GgufHeader:
    if blob[:4] != b"GGUF":
        raise ModelLoadError(f"{path} does not start with the GGUF magic bytes; it is not a GGUF file")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _VERSIONS:
        raise ModelLoadError(f"{path} is GGUF version {version}; only versions {_VERSIONS} (little-endian) are read")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _value(blob, pos + 4, value_type)
    if "general.architecture" not in metadata:
        raise ModelLoadError(f"{path} has no general.architecture in its metadata")
    tensors = []
    for _ in range(tensor_count):
        name, pos = _string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        shape = tuple(int(d) for d in reversed(dims))
        tensors.append(GgufTensorInfo(name, shape, ggml_type, offset, _nbytes(path, name, ggml_type, shape)))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    end = max((data_start + t.offset + t.nbytes for t in tensors), default=data_start)
    if end > len(blob):
        raise ModelLoadError(f"truncated GGUF file {path}: its tensors need {end} bytes, the file has {len(blob)}")
    return GgufHeader(path=path, metadata=metadata, tensors=tuple(tensors), data_start=data_start)


def _string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise ValueError(f"string at byte {pos} runs past the end of the file")
    return blob[pos + 8 : end].decode("utf-8"), end


def _value(blob: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type in _SCALARS:
        fmt = _SCALARS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _string(blob, pos)
    if value_type != _ARRAY:
        raise ValueError(f"unknown metadata value type {value_type} at byte {pos}")
    element_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if element_type in _SCALARS:
        fmt = _SCALARS[element_type]
        return list(struct.unpack_from(f"<{count}{fmt[1]}", blob, pos)), pos + count * struct.calcsize(fmt)
    if element_type != _STRING:
        raise ValueError(f"array of value type {element_type} at byte {pos} is not supported")
    for _ in range(count):  # a vocabulary or merge table: skipped, its length kept
        (length,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + length
    return count, pos


def _nbytes(path: Path, name: str, ggml_type: int, shape: tuple[int, ...]) -> int:
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has ggml type {ggml_type}, which the gguf package does not know; "
            f"re-convert the model with a current llama.cpp (e.g. to Q8_0 or F16)"
        ) from exc
    numel = math.prod(shape)
    if shape and shape[-1] % block:
        raise ModelLoadError(f"{path}: tensor {name!r} has {shape[-1]} columns, not a multiple of its block of {block}")
    return numel // block * type_size


def read_tensor_bytes(f: BinaryIO, header: GgufHeader, info: GgufTensorInfo) -> np.ndarray:
    """The stored bytes of one tensor as uint8 ``info.raw_shape``, read (not mapped) from the open file ``f``."""
    f.seek(header.data_start + info.offset)
    buffer = bytearray(info.nbytes)
    if f.readinto(buffer) != info.nbytes:
        raise ModelLoadError(f"truncated GGUF file {header.path}: tensor {info.name!r} is cut short")
    return np.frombuffer(buffer, dtype=np.uint8).reshape(info.raw_shape)
