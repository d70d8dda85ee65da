"""A safetensors checkpoint on disk: its shards, validated up front, and streamed one tensor at a time.

A Hugging Face directory holds either ``model.safetensors`` or ``model.safetensors.index.json`` whose
``weight_map`` names the shard of every tensor. ``open_checkpoint`` reads only the headers (8-byte
little-endian length + JSON) and fails with ``ModelLoadError`` before any weight is read when a shard is
missing, a header is malformed, or a file is shorter than its header says (a truncated download).

``Checkpoint.tensors()`` yields ``(name, tensor)`` in file order through ``safetensors.safe_open``. A
``safe_open`` handle memory-maps its file and every page read stays resident until the handle closes,
so the handle is reopened after each ``REOPEN_BYTES`` read: the resident set stays near one tensor
instead of growing to the whole shard.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from qlorakit.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Bytes read through one ``safe_open`` handle before it is closed and reopened (bounds resident pages).
REOPEN_BYTES = 64 * 2**20

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, safetensors dtype name, shape and byte range in the data section."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a validated safetensors checkpoint, by name."""

    directory: Path
    shards: tuple[Path, ...]
    entries: dict[str, TensorEntry]

    @property
    def nbytes(self) -> int:
        return sum(e.end - e.begin for e in self.entries.values())

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every entry, shard by shard in file order, read one at a time."""
        for shard in self.shards:
            names = sorted((e.begin, n) for n, e in self.entries.items() if e.shard == shard)
            yield from _stream_shard(shard, {n: self.entries[n].end - self.entries[n].begin for _, n in names})


def _stream_shard(path: Path, sizes: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one shard in the order of ``sizes`` (name -> bytes), reopening per ``REOPEN_BYTES``."""
    from safetensors import safe_open

    with ExitStack() as stack:
        handle, read = None, 0
        for name, nbytes in sizes.items():
            if handle is None or read >= REOPEN_BYTES:
                stack.close()
                handle, read = stack.enter_context(safe_open(str(path), framework="pt")), 0
            read += nbytes
            yield name, handle.get_tensor(name)  # not kept in this frame while the caller converts it


def open_checkpoint(directory: Path) -> Checkpoint:
    """Find and validate the safetensors shards of ``directory`` (see the module docstring)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        shards = tuple(dict.fromkeys(directory / f for f in weight_map.values()))
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(
                f"{index} names shard(s) {missing} that are not in {directory}; the download is incomplete — "
                f"fetch the missing file(s) again"
            )
    elif (directory / SINGLE_FILE).is_file():
        weight_map, shards = None, (directory / SINGLE_FILE,)
    else:
        present = sorted(p.name for p in directory.iterdir())
        hint = (
            " (pickle .bin checkpoints are not read: re-save with save_pretrained(safe_serialization=True))"
            if any(p.endswith(".bin") for p in present)
            else ""
        )
        raise ModelLoadError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; it holds {present}{hint}")
    entries: dict[str, TensorEntry] = {}
    for shard in shards:
        entries.update(read_header(shard))
    if weight_map is not None:
        _check_index_matches(weight_map, entries, directory)
    return Checkpoint(directory=directory, shards=shards, entries=entries)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: 'weight_map' must map tensor names to shard files")
    return weight_map


def _check_index_matches(weight_map: dict[str, str], entries: dict[str, TensorEntry], directory: Path) -> None:
    absent = [k for k, shard in weight_map.items() if k not in entries or entries[k].shard.name != shard]
    if absent:
        raise ModelLoadError(
            f"{directory / INDEX_FILE} lists {len(absent)} tensor(s) that its shards do not hold, e.g. {absent[:5]} "
            f"(expected in {weight_map[absent[0]]}); a shard is stale or from another model"
        )


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of one ``.safetensors`` file; ``ModelLoadError`` names a truncated or corrupt file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelLoadError(
                f"truncated safetensors file {path}: {size} bytes, shorter than its 8-byte header length"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ModelLoadError(
                f"truncated safetensors file {path}: the header alone needs {8 + header_len} bytes, the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"corrupt safetensors file {path}: its header is not valid JSON ({exc})") from exc
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info)
    data_end = 8 + header_len + max((e.end for e in entries.values()), default=0)
    if data_end > size:
        raise ModelLoadError(
            f"truncated safetensors file {path}: its header describes {data_end} bytes, the file has {size}; "
            f"download it again"
        )
    return entries


def _entry(path: Path, name: str, info: dict) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"corrupt safetensors file {path}: bad header entry for {name!r} ({exc})") from exc
    if dtype not in DTYPE_SIZES or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise ModelLoadError(
            f"corrupt safetensors file {path}: tensor {name!r} ({dtype}, shape {list(shape)}) spans {end - begin} bytes"
        )
    return TensorEntry(shard=path, dtype=dtype, shape=shape, begin=begin, end=end)
