"""A safetensors checkpoint on disk: its shards, validated up front, and streamed one tensor at a time.

A Hugging Face directory holds either ``model.safetensors`` or ``model.safetensors.index.json`` whose
``weight_map`` names the shard of every tensor. ``open_checkpoint`` reads only the headers (8-byte
little-endian length + JSON) and fails with ``ModelLoadError`` before any weight is read when a shard is
missing, a header is malformed, or a file is shorter than its header says (a truncated download); the
checks are ``qlorakit.untrusted.read_safetensors_header``'s. Shard names in an index must be plain file
names: an index cannot make qlorakit read outside the model directory.

``Checkpoint.tensors()`` yields ``(name, tensor)`` in file order through ``safetensors.safe_open``. A
``safe_open`` handle memory-maps its file and every page read stays resident until the handle closes,
so the handle is reopened after each ``REOPEN_BYTES`` read: the resident set stays near one tensor
instead of growing to the whole shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from qlorakit.errors import ModelLoadError
from qlorakit.untrusted import check_file_name, decode_utf8, parse_json, read_safetensors_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Bytes read through one ``safe_open`` handle before it is closed and reopened (bounds resident pages).
REOPEN_BYTES = 64 * 2**20


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
                f"{index} names shard(s) {missing} (key 'weight_map') that are not in {directory}; the download is "
                f"incomplete — fetch the missing file(s) again"
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
    """``weight_map`` of an index: tensor name -> shard file name (a plain name inside the directory)."""
    text = decode_utf8(index.read_bytes(), str(index), ModelLoadError, bom=True)
    values = parse_json(text, str(index), ModelLoadError)
    weight_map = values.get("weight_map") if isinstance(values, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: key 'weight_map' must be a non-empty object mapping tensor names to shard "
                             f"files; got {type(weight_map).__name__}")
    for name, shard in weight_map.items():
        check_file_name(shard, f"{index}: key 'weight_map', tensor {name[:80]!r}: shard", ModelLoadError)
    return weight_map


def _check_index_matches(weight_map: dict[str, str], entries: dict[str, TensorEntry], directory: Path) -> None:
    absent = [k for k, shard in weight_map.items() if k not in entries or entries[k].shard.name != shard]
    if absent:
        raise ModelLoadError(
            f"{directory / INDEX_FILE}: key 'weight_map' lists {len(absent)} tensor(s) that its shards do not hold, "
            f"e.g. {absent[:5]} (expected in {weight_map[absent[0]]}); a shard is stale or from another model"
        )


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of one ``.safetensors`` file; ``ModelLoadError`` names a truncated or corrupt file.

    Validated as ``qlorakit.untrusted.read_safetensors_header`` describes, before any weight is read.
    """
    entries = read_safetensors_header(path, ModelLoadError)
    return {name: TensorEntry(path, e.dtype, e.shape, e.begin, e.end) for name, e in entries.items()}
