"""Read local data files into rows that remember where each row came from.

JSON (an array of objects), JSON Lines, CSV and Parquet are read through the ``datasets`` library
(``load_dataset("json" | "csv" | "parquet", data_files=..., split="train")``) with its cache in a
temporary directory that is deleted afterwards, so nothing is written next to the user's files or
into the user's Hugging Face cache. CSV cells are read as strings (an empty cell is ``""``).

Plain ``.txt`` files are ONE document each: the whole file, newlines kept (continued pre-training
text such as a play or a book is one stream; separate documents go into JSON Lines ``{"text": ...}``
rows, which are joined with EOS when packed).

Positions, used as ``<file>:<position>`` in every error message, are 1-based: the line number for
JSON Lines (blank lines skipped by the parser are counted) and ``.txt``; the record number for JSON
arrays, CSV (the header not counted) and Parquet. A ``.json`` file whose first character is not ``[``
is read as JSON Lines.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qlorakit.errors import DataError

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}


@dataclass(frozen=True)
class Table:
    """The rows of one file, each with its 1-based position (line or record number)."""

    path: str
    kind: str  # json | jsonl | csv | parquet | txt
    rows: list[dict[str, Any]]
    positions: list[int]

    @cached_property
    def columns(self) -> tuple[str, ...]:
        """Every field name that occurs in some row, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return tuple(seen)

    def where(self, index: int) -> str:
        """``<file>:<position>`` of row ``index`` (0-based) for error messages."""
        return f"{self.path}:{self.positions[index]}"


def read_table(path: str | Path) -> Table:
    """Read one data file; a missing, empty or unparsable file raises DataError naming it."""
    shown = str(path)
    file = Path(path)
    if not file.exists():
        raise DataError(f"{shown}: no such file; check the path (relative paths start at {Path.cwd()})")
    if not file.is_file():
        raise DataError(f"{shown}: not a regular file; pass data files, not directories")
    kind = SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise DataError(f"{shown}: unsupported file type '{file.suffix}'; use one of {', '.join(SUFFIXES)}")
    if file.stat().st_size == 0:
        raise DataError(f"{shown}: the file is empty")
    if kind == "txt":
        return _read_txt(file, shown)
    if kind in ("json", "jsonl"):
        return _read_json(file, shown, kind)
    if kind == "csv":
        rows = _load(file, shown, "csv", **_csv_options(file, shown))
    else:
        rows = _load(file, shown, "parquet")
    if not rows:
        raise DataError(f"{shown}: the file has no rows")
    return Table(shown, kind, rows, list(range(1, len(rows) + 1)))


def _read_txt(file: Path, shown: str) -> Table:
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{shown}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise DataError(f"{shown}: the file is empty (only whitespace)")
    return Table(shown, "txt", [{"text": text}], [1])


def _read_json(file: Path, shown: str, kind: str) -> Table:
    text = _decode(file, shown)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{shown}: the file is empty (only whitespace)")
    if kind == "json" and stripped[0] != "[":
        kind = "jsonl"
    try:
        rows = _load(file, shown, "json")
    except DataError:
        rows = _parse_json_ourselves(text, shown, kind)
    if not rows:
        raise DataError(f"{shown}: the file has no rows (an empty JSON array)")
    positions = list(range(1, len(rows) + 1))
    if kind == "jsonl":
        lines = [i + 1 for i, line in enumerate(text.split("\n")) if line.strip()]
        positions = lines if len(lines) == len(rows) else positions
    return Table(shown, kind, rows, positions)


def _decode(file: Path, shown: str) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{shown}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _parse_json_ourselves(text: str, shown: str, kind: str) -> list[dict[str, Any]]:
    """Locate the error ``datasets`` reported; rows it rejected only for mixed types are returned."""
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{shown}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
        if not isinstance(data, list):
            raise DataError(f"{shown}: a .json file must hold an array of objects, got {type(data).__name__}")
        return [_object(item, f"{shown}:{i + 1}") for i, item in enumerate(data)]
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(_object(json.loads(line), f"{shown}:{number}"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{shown}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    return rows


def _object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: a row must be a JSON object with named fields, got {type(item).__name__}")
    return item


def _csv_options(file: Path, shown: str) -> dict[str, Any]:
    """Read every column as text: the header names the columns, empty cells stay ``""``."""
    import datasets

    with file.open(newline="", encoding="utf-8-sig") as handle:
        try:
            header = next(csv.reader(handle), [])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{shown}:1: cannot read the CSV header ({exc})") from exc
    if not header or not any(name.strip() for name in header):
        raise DataError(f"{shown}: the CSV file has no header row naming its columns")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _load(file: Path, shown: str, builder: str, **options: Any) -> list[dict[str, Any]]:
    """``datasets.load_dataset`` with a throw-away cache; parser failures become DataError."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="qlorakit-data-") as cache, _quiet(datasets):
        try:
            table = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache, **options)
        except Exception as exc:  # datasets wraps the parsers' errors in several exception types
            if "corresponds to no data" in str(exc):  # datasets' message for a file without rows
                return []
            cause = exc.__cause__ or exc.__context__ or exc
            why = _first_line(cause) or type(cause).__name__
            raise DataError(f"{shown}: cannot parse as {builder.upper()}: {why}") from exc
        return table.to_list()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n")[0]


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """Hide the progress bars and parser-fallback logs of ``load_dataset``; restore the caller's settings.

    Parse errors are reported as DataError with the line, so the library's own log lines are noise.
    """
    logging = datasets.utils.logging
    was_enabled, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if was_enabled:
            logging.enable_progress_bar()
