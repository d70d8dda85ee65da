"""Checks on the content of files a user hands in, shared by every reader (imports nothing heavy).

A hostile or corrupt file must fail with a ``QlorakitError`` that names the file and a position in it,
never with a bare ``UnicodeDecodeError`` / ``RecursionError`` / ``KeyError`` and never after allocating
what the file merely claims. The readers (data, models, lora, eval) use these helpers for the parts
they share; each passes the error class its callers expect.

- ``decode_utf8``: bytes to text; a bad byte is reported with its line and byte offset.
- ``parse_json``: ``json.loads`` whose three failure modes on hostile text (``JSONDecodeError``; the
  ``ValueError`` of an integer longer than Python's 4,300-digit conversion limit; the
  ``RecursionError`` of brackets nested deeper than the interpreter's stack) are reported with the
  line and column.
- ``check_json_depth``: JSON nested deeper than ``MAX_JSON_DEPTH`` is refused before a C parser sees
  it (pyarrow's JSON reader, under ``datasets``, segfaults on 50,000 nested brackets).
- ``check_file_name``: a name that comes from a file or a user and becomes one component of a path
  (a shard named by an index, an adapter name) must not leave its directory: no separator, no ``..``,
  no NUL, not absolute, at most 255 bytes.
- ``read_safetensors_header``: a safetensors file's tensor table, validated as the ``safetensors``
  library validates it, with the claimed header length checked against ``MAX_HEADER_BYTES`` and the
  file size before the header is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from qlorakit.errors import QlorakitError

#: The safetensors library refuses headers above 100 MB (``safetensors::tensor::MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
#: Longest name of one path component on Linux, macOS and Windows filesystems (bytes).
MAX_NAME_BYTES = 255

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

#: JSON nested deeper than this is refused before parsing: Python's parser fails near 1,000 levels (the
#: recursion limit) and pyarrow's, under ``datasets``, crashes the process (segfault) at 50,000.
MAX_JSON_DEPTH = 1000

_LONG_INTEGER = re.compile(r"\d{4000,}")


def decode_utf8(raw: bytes, shown: str, error: type[QlorakitError], bom: bool = False) -> str:
    """``raw`` as UTF-8 text (a leading BOM dropped when ``bom``); ``error`` names the line and byte."""
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{shown}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _deepest(text: str) -> int:
    """Index of the first bracket at the greatest nesting depth of ``text`` (strings skipped)."""
    depth = best = where = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best, where = depth, i
        elif ch in "]}":
            depth -= 1
    return where


class _NotStrictJson(ValueError):
    """JSON that Python's parser accepts and RFC 8259 parsers (serde_json, under safetensors) refuse."""

    def __init__(self, problem: str, needle: str) -> None:
        super().__init__(problem)
        self.needle = needle  # text to look for to locate the problem


def _strict_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _NotStrictJson(f"key {key[:80]!r} appears twice in one object", json.dumps(key))
        seen[key] = value
    return seen


def _strict_constant(name: str) -> Any:
    raise _NotStrictJson(f"{name} is not a JSON value", name)


def _load_strict(text: str) -> Any:
    """``json.loads`` refusing NaN/Infinity, repeated keys and lone surrogates (``\\ud800``)."""
    value = json.loads(text, object_pairs_hook=_strict_pairs, parse_constant=_strict_constant)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        match = re.search(r"\\u[dD][89a-fA-F]", text)
        raise _NotStrictJson("a string holds a lone surrogate escape", match.group() if match else '"') from None
    return value


def parse_json(text: str, shown: str, error: type[QlorakitError], line_offset: int = 0, strict: bool = False) -> Any:
    """``json.loads(text)``; a failure raises ``error("<shown>:<line>: not valid JSON (..., column C)")``.

    ``line_offset`` is added to the line (``text`` is line ``line_offset + 1`` of a JSON Lines file);
    ``strict`` also refuses what only Python accepts (``_load_strict``).
    """
    try:
        return _load_strict(text) if strict else json.loads(text)
    except json.JSONDecodeError as exc:
        line, col, why = exc.lineno, exc.colno, exc.msg
    except RecursionError:
        (line, col), why = _line_col(text, _deepest(text)), "arrays or objects nested too deeply"
    except _NotStrictJson as exc:
        (line, col), why = _line_col(text, max(0, text.find(exc.needle))), str(exc)
    except ValueError as exc:  # int() of more than sys.get_int_max_str_digits() digits
        match = _LONG_INTEGER.search(text)
        (line, col) = _line_col(text, match.start()) if match else (1, 1)
        why = f"an integer too long to convert ({str(exc).split(':')[0]})"
    raise error(f"{shown}:{line + line_offset}: not valid JSON ({why}, column {col})") from None


def json_depth_position(raw: bytes, limit: int = MAX_JSON_DEPTH) -> int | None:
    """Byte offset of the first bracket of JSON ``raw`` (outside strings) nested deeper than ``limit``, or None.

    Vectorized over the bytes (UTF-8 multi-byte characters contain no ASCII byte): a quote is real
    unless an odd run of backslashes precedes it, a bracket is inside a string when an odd number of
    real quotes precede it, and the depth is the cumulative sum of the other brackets. Exact for valid
    JSON (which has no backslash outside strings); ~15 ms per MB. Fewer brackets than ``limit``: no scan.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return None
    import numpy as np

    data = np.frombuffer(raw, dtype=np.uint8)
    quotes = np.flatnonzero(data == ord('"'))
    slashes = np.flatnonzero(data == ord("\\"))
    if slashes.size and quotes.size:
        run_start = np.maximum.accumulate(np.where(np.diff(slashes, prepend=-2) != 1, np.arange(slashes.size), 0))
        last = np.searchsorted(slashes, quotes) - 1  # the last backslash before each quote
        adjacent = (last >= 0) & (slashes[np.maximum(last, 0)] == quotes - 1)
        run = np.where(adjacent, last - run_start[np.maximum(last, 0)] + 1, 0)
        quotes = quotes[run % 2 == 0]
    opens = (data == ord("[")) | (data == ord("{"))
    brackets = np.flatnonzero(opens | (data == ord("]")) | (data == ord("}")))
    outside = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    depth = np.cumsum(np.where(opens[outside], 1, -1))
    deep = np.flatnonzero(depth > limit)
    return int(outside[deep[0]]) if deep.size else None


def check_json_depth(raw: bytes, shown: str, error: type[QlorakitError], limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before a C parser sees it (pyarrow's crashes on 50,000)."""
    deep = json_depth_position(raw, limit)
    if deep is not None:
        line = raw.count(b"\n", 0, deep) + 1
        raise error(f"{shown}:{line}: not valid JSON (arrays or objects nested deeper than {limit} levels at "
                    f"byte {deep})")


def check_file_name(name: Any, what: str, error: type[QlorakitError]) -> str:
    """``name`` if it is one plain path component (see the module docstring), else ``error`` naming it."""
    if not isinstance(name, str) or not name:
        raise error(f"{what} must be a non-empty string, got {name!r}")
    problem = None
    if "/" in name or "\\" in name or os.sep in name:
        problem = "contains a path separator"
    elif name in (".", ".."):
        problem = "is a relative directory"
    elif "\x00" in name:
        problem = "contains a NUL character"
    elif Path(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        problem = "is an absolute path"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise error(f"{what} {name[:80]!r} {problem}; it must be a plain name inside its directory")
    return name


# --- safetensors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype name, shape, byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _HeaderCheck:
    """Raises ``error`` with the file named and the prefix the readers' tests rely on."""

    def __init__(self, path: Path, error: type[QlorakitError]) -> None:
        self.path, self.error = path, error

    def corrupt(self, problem: str) -> NoReturn:
        raise self.error(f"corrupt safetensors file {self.path}: {problem}")

    def truncated(self, problem: str) -> NoReturn:
        raise self.error(f"truncated safetensors file {self.path}: {problem}; download it again")


def read_safetensors_header(path: Path, error: type[QlorakitError]) -> dict[str, HeaderEntry]:
    """The tensor table of ``path`` (``__metadata__`` excluded), validated before any tensor is read.

    Layout: an 8-byte little-endian length ``N``, ``N`` bytes of UTF-8 JSON (an object starting with
    ``{``), then the data section. Refused: ``N`` above ``MAX_HEADER_BYTES`` or past the end of the file
    (checked before reading it); a header that is not a strict JSON object (no NaN, no repeated key, no
    lone surrogate: the library's serde_json refuses them); ``__metadata__`` that is not a
    string-to-string map; an entry whose dtype is unknown, whose shape is not integers in ``[0, 2^64)``
    (with fewer than 2^64 bytes in all), or whose ``data_offsets`` are not ``[begin, end]`` integers
    spanning ``prod(shape) * itemsize`` bytes; entries that do not tile the data section exactly (a
    gap, an overlap, or trailing bytes).
    """
    check = _HeaderCheck(path, error)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            check.truncated(f"{size} bytes, shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            check.corrupt(f"the header length at byte 0 claims {header_len} bytes, above the limit of "
                          f"{MAX_HEADER_BYTES} (the file has {size})")
        if 8 + header_len > size:
            check.truncated(f"the header alone needs {8 + header_len} bytes (length at byte 0), the file has {size}")
        raw = f.read(header_len)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        check.corrupt(f"its header is not UTF-8 ({exc.reason} at byte {8 + exc.start})")
    if not text.startswith("{"):
        check.corrupt("its header (byte 8) is not a JSON object")
    header = parse_json(text, f"corrupt safetensors file {path}, JSON header", error, strict=True)
    if not isinstance(header, dict):
        check.corrupt(f"its header (byte 8) is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        check.corrupt("key '__metadata__' must map strings to strings")
    entries = {name: _entry(check, name, info) for name, info in header.items()}
    _check_tiling(check, entries, size - 8 - header_len)
    return entries


def _is_index(value: Any) -> bool:
    """A non-negative integer that fits the u64 (``usize``) the safetensors library reads it into."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _entry(check: _HeaderCheck, name: str, info: Any) -> HeaderEntry:
    where = f"tensor {name[:80]!r}"
    if not isinstance(info, dict):
        check.corrupt(f"{where}: the entry is a {type(info).__name__}, not an object with dtype, shape, data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        check.corrupt(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
        check.corrupt(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets))
            and offsets[0] <= offsets[1]):
        check.corrupt(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if math.prod(s for s in shape if s) * DTYPE_SIZES[dtype] >= 2**64:
        check.corrupt(f"{where}: shape {shape} holds more than 2^64 bytes")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        check.corrupt(f"{where} ({dtype}, shape {shape}) spans {end - begin} bytes, not "
                      f"{math.prod(shape) * DTYPE_SIZES[dtype]}")
    return HeaderEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(check: _HeaderCheck, entries: dict[str, HeaderEntry], data_bytes: int) -> None:
    """Sorted by offset, the tensors must cover ``[0, data_bytes)`` with no gap and no overlap."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            gap = "overlaps the previous one" if entry.begin < position else "leaves a gap before it"
            check.corrupt(f"tensor {name[:80]!r} starts at data byte {entry.begin} and {gap} (expected {position})")
        position = entry.end
    if position > data_bytes:
        check.truncated(f"its header describes {position} data bytes, the file has {data_bytes} after the header")
    if position < data_bytes:
        check.corrupt(f"the header describes {position} data bytes but {data_bytes} follow it (trailing bytes "
                      f"from data byte {position})")
