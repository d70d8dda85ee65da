"""Hostile inputs: random bytes and mutations of small valid files (shared by tests/fuzz and the benchmark).

Every generator takes a ``random.Random``: the tests pass Hypothesis' ``st.randoms()`` (so a failure
shrinks), ``benchmarks/fuzz_readers.py`` a seeded ``random.Random`` (so a count of 10,000 is cheap).

- ``mutate_bytes``: one to three of bit flips, truncation, overwriting / inserting / deleting /
  duplicating a span, and writing a huge or boundary integer (``HUGE_INTEGERS``, as u32 or u64
  little-endian) over a length field of the seed (``fields``: its byte offsets) or anywhere.
- ``mutate_json``: a valid JSON value with one node replaced by a value of the wrong type, a key
  removed or added, or raw text no writer produces (a 5,000-digit integer, 50,000 nested brackets,
  ``NaN``, a lone surrogate escape).
- ``mutate_rows``: CSV-like records with cells replaced by quotes, newlines, NUL, a 200,000-character
  field, or rows with a cell too many or too few.
"""

from __future__ import annotations

import csv
import io
import json
import random
import struct
from typing import Any

HUGE_INTEGERS = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1, 2**64 - 1)

#: Values of the wrong type (or at the edge of the right one) put into a JSON document.
WRONG_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 3, 2**64, 1.5, -0.0, 1e308, "", " ", "x", "\x00", "../../etc/passwd", "/abs",
    "a" * 300, [], [1, 2], ["x", None], [[1]], {}, {"a": 1}, {"role": "user"},
)

#: JSON text that ``json.dumps`` never writes but a hostile file can hold.
RAW_JSON = (
    "1" * 5000,  # beyond Python's 4,300-digit int conversion limit: ValueError, not JSONDecodeError
    "[" * 50_000 + "]" * 50_000,  # deeper than the recursion limit: RecursionError
    "NaN", "Infinity", "-Infinity", "1e999", '"\\ud800"', '"\\u0000"', "-", '"', "{", "}",
)

#: Cell values for CSV-like files.
WRONG_CELLS = ("", '"', '""', "\n", "\r", ",", "\x00", "a,b", '"quoted, with comma"', "x" * 200_000, "\ufeff", " ")

_PLACEHOLDER = "@@hostile-raw-{}@@"


def random_bytes(rng: random.Random, max_len: int = 512) -> bytes:
    """Uniform random bytes of a random length (0 to ``max_len``)."""
    return rng.randbytes(rng.randrange(max_len + 1))


def random_text(rng: random.Random, alphabet: str, max_len: int = 256) -> bytes:
    """UTF-8 text drawn from ``alphabet`` (structure characters of a format, so parsers get further)."""
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len + 1))).encode("utf-8", "surrogatepass")


def mutate_bytes(data: bytes, rng: random.Random, fields: tuple[int, ...] = (), region: int | None = None) -> bytes:
    """``data`` after one to three random byte-level edits (see the module docstring).

    ``fields``: byte offsets of integer fields (lengths, counts) that the huge-integer edit prefers;
    ``region``: edits fall in ``data[:region]`` (the header of a binary file) when given.
    """
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(_BYTE_OPS)
        out = op(out, rng, fields, min(region or len(out), len(out)))
    return bytes(out)


def _flip_bits(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        if end:
            out[rng.randrange(end)] ^= 1 << rng.randrange(8)
    return out


def _truncate(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    return out[: rng.randrange(len(out) + 1)]


def _overwrite(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    start = rng.randrange(end + 1)
    chunk = rng.randbytes(rng.randint(1, 16))
    out[start : start + len(chunk)] = chunk
    return out


def _insert(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    start = rng.randrange(end + 1)
    out[start:start] = rng.randbytes(rng.randint(1, 64))
    return out


def _delete(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    start = rng.randrange(end + 1)
    del out[start : start + rng.randint(1, 64)]
    return out


def _duplicate(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    start = rng.randrange(end + 1)
    span = out[start : start + rng.randint(1, 256)]
    out[start:start] = span * rng.randint(1, 4)
    return out


def _huge_integer(out: bytearray, rng: random.Random, fields: tuple[int, ...], end: int) -> bytearray:
    start = rng.choice(fields) if fields and rng.random() < 0.8 else rng.randrange(end + 1)
    value = rng.choice(HUGE_INTEGERS) + rng.choice((0, 0, -1, 1))
    width = rng.choice((4, 8))
    packed = struct.pack("<Q", value % 2**64)[:width]
    out[start : start + width] = packed
    return out


_BYTE_OPS = (_flip_bits, _truncate, _overwrite, _insert, _delete, _duplicate, _huge_integer, _huge_integer)


# --- JSON ------------------------------------------------------------------------------------------


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys/indexes) of every node of a JSON value, the root included."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_nodes(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_nodes(item, (*path, index)))
    return found


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replace(value[head], rest, new)
    return copy


def _parent_edit(value: Any, path: tuple, rng: random.Random) -> Any:
    """Remove the node at ``path`` from its object/array, or add a stray key next to it."""
    parent_path, key = path[:-1], path[-1]
    parent = value
    for step in parent_path:
        parent = parent[step]
    copy = dict(parent) if isinstance(parent, dict) else list(parent)
    if rng.random() < 0.5:
        del copy[key]
    elif isinstance(copy, dict):
        copy[rng.choice(("__metadata__", "", "extra", "score", "text", "r"))] = rng.choice(WRONG_VALUES)
    else:
        copy.insert(key, rng.choice(WRONG_VALUES))
    return _replace(value, parent_path, copy)


def mutate_json(value: Any, rng: random.Random) -> str:
    """JSON text of ``value`` with one or two nodes made hostile (see the module docstring)."""
    raws: list[str] = []
    for _ in range(rng.randint(1, 2)):
        path = rng.choice(_nodes(value))
        roll = rng.random()
        if path and roll < 0.25:
            value = _parent_edit(value, path, rng)
        elif roll < 0.4:
            value = _replace(value, path, _PLACEHOLDER.format(len(raws)))
            raws.append(rng.choice(RAW_JSON))
        else:
            value = _replace(value, path, rng.choice(WRONG_VALUES))
    text = json.dumps(value, allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_PLACEHOLDER.format(i)), raw)
    return text


def mutate_json_lines(rows: list[Any], rng: random.Random) -> str:
    """JSON Lines of ``rows`` with one line mutated, removed, doubled, or made blank/garbage."""
    lines = [json.dumps(row) for row in rows]
    index = rng.randrange(len(lines))
    roll = rng.random()
    if roll < 0.6:
        lines[index] = mutate_json(rows[index], rng)
    elif roll < 0.8:
        lines.insert(index, rng.choice(("", "   ", "\x00", "[", "null", '"text"', "{}", "\ufeff{}")))
    else:
        del lines[index]
    return "\n".join(lines) + rng.choice(("\n", "", "\r\n"))


# --- CSV-like records ------------------------------------------------------------------------------


def mutate_rows(rows: list[list[str]], rng: random.Random) -> str:
    """CSV text of ``rows`` (header first) with cells made hostile or rows made ragged."""
    rows = [list(row) for row in rows]
    for _ in range(rng.randint(1, 3)):
        row = rng.choice(rows)
        roll = rng.random()
        if roll < 0.6 and row:
            row[rng.randrange(len(row))] = rng.choice(WRONG_CELLS)
        elif roll < 0.8:
            row.append(rng.choice(WRONG_CELLS))
        elif row:
            row.pop()
    quoting, ending = rng.choice((csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE)), rng.choice(("\n", "\r\n"))
    buffer = io.StringIO()
    try:
        csv.writer(buffer, quoting=quoting, escapechar="\\", lineterminator=ending).writerows(rows)
    except csv.Error:  # QUOTE_NONE cannot write a record of one empty field
        buffer = io.StringIO()
        csv.writer(buffer, escapechar="\\", lineterminator=ending).writerows(rows)
    return buffer.getvalue()
