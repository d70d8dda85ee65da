"""Read local data files into rows that remember where each row came from.

JSON (an array of objects) and JSON Lines are parsed here with Python's ``json`` and given one schema
(``unify``: a field missing from a row is ``None``, as ``datasets`` gives); CSV and Parquet are read
through the ``datasets`` library (``load_dataset("csv" | "parquet", data_files=..., split="train")``)
with its cache in a temporary directory that is deleted afterwards, so nothing is written next to the
user's files or into the user's Hugging Face cache. CSV cells are read as strings (an empty cell is
``""``). ``datasets`` (with pandas and pyarrow: about 80 MiB of resident memory for a training run) is
imported only for those two.

Plain ``.txt`` files are ONE document each: the whole file, newlines kept (continued pre-training
text such as a play or a book is one stream; separate documents go into JSON Lines ``{"text": ...}``
rows, which are joined with EOS when packed).

Positions, used as ``<file>:<position>`` in every error message, are 1-based: the line number for
JSON Lines (blank lines skipped by the parser are counted) and ``.txt``; the record number for JSON
arrays, CSV (the header not counted) and Parquet. A ``.json`` file whose first character is not ``[``
is read as JSON Lines.

Hostile files: JSON and JSON Lines are decoded, checked for nesting deeper than
``untrusted.MAX_JSON_DEPTH`` and parsed row by row with Python's ``json``, so every malformed row
fails with its position (pyarrow's JSON reader, which crashes on a first row ``null`` or 50,000 nested
brackets in pyarrow 26, is not used). A CSV or
Parquet file that ``datasets`` cannot parse is parsed again here (``csv`` / ``pyarrow.parquet``, row
group by row group) to name the line or row group at fault.
"""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qlorakit.errors import DataError
from qlorakit.untrusted import check_json_depth, decode_utf8, parse_json

PARQUET_MAGIC = b"PAR1"
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
    text = decode_utf8(file.read_bytes(), shown, DataError)
    if not text.strip():
        raise DataError(f"{shown}: the file is empty (only whitespace)")
    return Table(shown, "txt", [{"text": text}], [1])


def _read_json(file: Path, shown: str, kind: str) -> Table:
    raw = file.read_bytes()
    text = decode_utf8(raw, shown, DataError, bom=True)
    check_json_depth(raw, shown, DataError)  # before pyarrow's parser, which crashes on deep nesting
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{shown}: the file is empty (only whitespace)")
    if kind == "json" and stripped[0] != "[":
        kind = "jsonl"
    rows = _parse_json_ourselves(text, shown, kind)
    if not rows:
        raise DataError(f"{shown}: the file has no rows (an empty JSON array)")
    rows = unify(rows)  # one schema, as the other readers give: missing fields are None
    positions = list(range(1, len(rows) + 1))
    if kind == "jsonl":
        lines = [i + 1 for i, line in enumerate(text.split("\n")) if line.strip()]
        positions = lines if len(lines) == len(rows) else positions
    return Table(shown, kind, rows, positions)


def _parse_json_ourselves(text: str, shown: str, kind: str) -> list[dict[str, Any]]:
    """Every row parsed and checked to be an object; the first bad one raises DataError with its position."""
    if kind == "json":
        data = parse_json(text, shown, DataError)
        if not isinstance(data, list):
            raise DataError(f"{shown}: a .json file must hold an array of objects, got {type(data).__name__}")
        return [_object(item, f"{shown}:{i + 1}") for i, item in enumerate(data)]
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append(_object(parse_json(line, shown, DataError, line_offset=number - 1), f"{shown}:{number}"))
    return rows


def unify(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with one set of fields: every row gets every field some row has, in first-seen order, missing ones
    ``None``; values are kept as parsed (nested objects too). What ``datasets.load_dataset("json")`` gives
    (``tests/data/test_readers.py`` holds the two to each other on the bundled and shared data); the input is
    not changed."""
    names = dict.fromkeys(name for row in rows for name in row)
    return [{name: row.get(name) for name in names} for row in rows]


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
        raise DataError(f"{shown}:1: the CSV file has no header row naming its columns")
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
            where = _LOCATORS[builder](file) if builder in _LOCATORS else ""
            raise DataError(f"{shown}: cannot parse as {builder.upper()}: {why}{where}") from exc
        try:
            return table.to_list()
        except UnicodeDecodeError as exc:  # Parquet strings are not checked for UTF-8 until they become str
            row, field = _first_bad_text(table.data)
            raise DataError(f"{shown}: row {row}, field {field!r}: not valid UTF-8 text ({exc.reason})") from None


def _first_bad_text(arrow_table: Any) -> tuple[int, str]:
    """(1-based row, column) of the first value that does not decode as UTF-8 (the slow path of an error)."""
    for name in arrow_table.column_names:
        column = arrow_table.column(name)
        for index in range(len(column)):
            try:
                column[index].as_py()
            except UnicodeDecodeError:
                return index + 1, name
    return 1, arrow_table.column_names[0]  # not reached: to_list() failed on some value


def _locate_csv(file: Path) -> str:
    """Where Python's ``csv`` finds the file malformed: a bad record, or a field count unlike the header's."""
    text = file.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return f" (Python's csv reads every line; the header, line 1, names {len(header or [])} columns)"
        except csv.Error as exc:
            return f" (line {reader.line_num}: {exc})"
        if header is None:
            header = record
        elif record and len(record) != len(header):
            return f" (line {reader.line_num}: {len(record)} fields, the header has {len(header)})"


def _locate_parquet(file: Path) -> str:
    """The part of a Parquet file pyarrow cannot read: the magic bytes, the footer, or a row group."""
    import pyarrow.parquet as pq

    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 8))
        tail = f.read(8)
    if size < 12 or head != PARQUET_MAGIC or tail[4:] != PARQUET_MAGIC:
        return f" (no 'PAR1' magic at byte 0 and at byte {max(0, size - 4)}: not a Parquet file, or truncated)"
    footer = int.from_bytes(tail[:4], "little")
    if footer > size - 12:
        return f" (the footer length at byte {size - 8} claims {footer} bytes; the file has {size})"
    try:
        parquet = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ... on a corrupt footer
        return f" (the footer, bytes {size - 8 - footer}-{size - 8}: {_first_line(exc)})"
    start = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            parquet.read_row_group(group)
        except Exception as exc:  # a corrupt page or column chunk
            return f" (row group {group}, rows {start + 1}-{start + rows}: {_first_line(exc)})"
        start += rows
    return f" (pyarrow reads the footer and all {parquet.num_row_groups} row group(s); rows 1-{start})"


_LOCATORS = {"csv": _locate_csv, "parquet": _locate_parquet}


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
