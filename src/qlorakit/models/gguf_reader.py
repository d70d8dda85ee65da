"""Reading a GGUF file's header: metadata, the tensor table and where each tensor's bytes lie.

Layout (GGUF v2/v3, little-endian): ``b"GGUF"``, version u32, tensor count u64, metadata count u64; the
metadata as ``key: string, type: u32, value``; then per tensor ``name, n_dims: u32, dims: u64[n]``
(innermost first), ``ggml type: u32, offset: u64``; the data section starts at the next multiple of
``general.alignment`` (default 32). Strings are ``u64 length + UTF-8 bytes``.

Only the header is parsed, and string arrays (the 49k-entry vocabulary of a tokenizer) are skipped and
stored as their length (so are number arrays above ``MAX_ARRAY_ITEMS`` entries): this takes
milliseconds, where ``gguf.GGUFReader`` builds a numpy view per vocabulary entry. Tensor bytes are
read on demand with plain file reads (``read_tensor_bytes``) so only the tensor being read is resident.
Sizes of block-quantized types come from ``gguf.GGML_QUANT_SIZES``.

A hostile file is refused before it costs memory: every count and length is checked against the bytes
left in the file before it is used (a header claiming 2^40 tensors or a 2^60-byte string fails at
once), a tensor has at most 4 dimensions, names are UTF-8, tensor names are unique,
``general.alignment`` is a power of two, and every tensor's bytes lie inside the file. Each error names
the byte offset of the field at fault.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from qlorakit.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)
_FIXED_HEADER = 24  # magic, version u32, tensor count u64, metadata count u64
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, a one-byte value
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32

#: Metadata arrays of numbers longer than this are skipped like string arrays (their length kept). The
#: largest in real files, a 262k-token vocabulary's scores, is 16x shorter; the bound keeps the parsed
#: header's Python objects under ~150 MB whatever the file claims.
MAX_ARRAY_ITEMS = 2**22


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
    """Parse the header of ``path``; a malformed or truncated file raises ``ModelLoadError`` naming it.

    Every count and length the file claims is checked against the bytes left in the file before
    anything is allocated for it, and every error names the byte offset of the field at fault.
    """
    if path.stat().st_size < _FIXED_HEADER:
        raise ModelLoadError(f"{path}: {path.stat().st_size} bytes, shorter than the {_FIXED_HEADER}-byte GGUF "
                             "header (byte 0); it is not a GGUF file or it is truncated")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        return _parse(_Cursor(path, blob))


class _Cursor:
    """Little-endian reads from the mapped file; a read past the end names the field and its byte offset."""

    def __init__(self, path: Path, blob: mmap.mmap) -> None:
        self.path, self.blob, self.pos = path, blob, 0

    def fail(self, problem: str, at: int | None = None) -> NoReturn:
        at = self.pos if at is None else at
        raise ModelLoadError(f"{self.path}: {problem} (at byte {at}); the file is truncated or corrupt")

    def left(self) -> int:
        return len(self.blob) - self.pos

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if size > self.left():
            self.fail(f"{what} runs past the end of the file ({len(self.blob)} bytes)")
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += size
        return values

    def count(self, fmt: str, what: str, min_bytes: int) -> int:
        """A u32/u64 count of items of at least ``min_bytes`` each, refused if the rest of the file is too short."""
        at = self.pos
        (n,) = self.unpack(fmt, what)
        if n * min_bytes > self.left():
            needs = f"{n} bytes" if min_bytes == 1 else f"{n}, at least {n * min_bytes} bytes"
            self.fail(f"{what} claims {needs}; only {self.left()} bytes are left", at)
        return n

    def string(self, what: str) -> str:
        length = self.count("<Q", f"the length of {what}", 1)
        raw = self.blob[self.pos : self.pos + length]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{what} is not valid UTF-8 ({exc.reason})", self.pos + exc.start)
        self.pos += length
        return text


def _parse(cur: _Cursor) -> GgufHeader:
    if cur.blob[:4] != b"GGUF":
        raise ModelLoadError(f"{cur.path} does not start with the GGUF magic bytes (byte 0); it is not a GGUF file")
    cur.pos = 4
    (version,) = cur.unpack("<I", "the version")
    if version not in _VERSIONS:
        cur.fail(f"GGUF version {version}; only versions {_VERSIONS} (little-endian) are read", 4)
    tensor_count = cur.count("<Q", "the tensor count", _MIN_TENSOR_BYTES)
    kv_count = cur.count("<Q", "the metadata count", _MIN_KV_BYTES)
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("a metadata key")
        (value_type,) = cur.unpack("<I", f"the type of key {key!r}")
        metadata[key] = _value(cur, value_type, key)
    _check_metadata(cur, metadata)
    tensors = [_tensor_info(cur) for _ in range(tensor_count)]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        cur.fail(f"tensor {duplicate!r} is listed twice in the tensor table")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // alignment) * alignment
    end = max((data_start + t.offset + t.nbytes for t in tensors), default=data_start)
    if end > len(cur.blob):
        raise ModelLoadError(f"truncated GGUF file {cur.path}: its tensors need {end} bytes (data section from byte "
                             f"{data_start}), the file has {len(cur.blob)}")
    return GgufHeader(path=cur.path, metadata=metadata, tensors=tuple(tensors), data_start=data_start)


def _check_metadata(cur: _Cursor, metadata: dict[str, Any]) -> None:
    """``general.architecture`` a non-empty string; ``general.alignment`` (if given) a power-of-two integer."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        cur.fail(f"key 'general.architecture' is {arch!r}; the metadata must name the model's architecture")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        cur.fail(f"key 'general.alignment' is {alignment!r}, not a positive power of two")


def _tensor_info(cur: _Cursor) -> GgufTensorInfo:
    name = cur.string("a tensor name")
    at = cur.pos
    (n_dims,) = cur.unpack("<I", f"the dimension count of tensor {name!r}")
    if n_dims > _MAX_DIMS:
        cur.fail(f"tensor {name!r} claims {n_dims} dimensions; GGUF allows at most {_MAX_DIMS}", at)
    dims = cur.unpack(f"<{n_dims}Q", f"the shape of tensor {name!r}")
    ggml_type, offset = cur.unpack("<IQ", f"the type and offset of tensor {name!r}")
    shape = tuple(int(d) for d in reversed(dims))
    return GgufTensorInfo(name, shape, ggml_type, offset, _nbytes(cur.path, name, ggml_type, shape))


def _value(cur: _Cursor, value_type: int, key: str) -> Any:
    if value_type in _SCALARS:
        return cur.unpack(_SCALARS[value_type], f"the value of key {key!r}")[0]
    if value_type == _STRING:
        return cur.string(f"the value of key {key!r}")
    if value_type != _ARRAY:
        cur.fail(f"key {key!r} has unknown value type {value_type}", cur.pos - 4)
    at = cur.pos
    (element_type,) = cur.unpack("<I", f"the element type of key {key!r}")
    if element_type in _SCALARS:
        size = struct.calcsize(_SCALARS[element_type])
        count = cur.count("<Q", f"the array length of key {key!r}", size)
        if count > MAX_ARRAY_ITEMS:  # skipped like a string array: its length kept
            cur.pos += count * size
            return count
        return list(cur.unpack(f"<{count}{_SCALARS[element_type][1]}", f"the array of key {key!r}"))
    if element_type != _STRING:
        cur.fail(f"key {key!r} is an array of value type {element_type}, which is not supported", at)
    count = cur.count("<Q", f"the array length of key {key!r}", 8)
    for i in range(count):  # a vocabulary or merge table: skipped, its length kept
        length = cur.count("<Q", f"the length of element {i} of key {key!r}", 1)
        cur.pos += length
    return count


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
