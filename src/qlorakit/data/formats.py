"""Dataset formats: detect a file's format from its fields and convert every row to one canonical type.

| format          | fields of a row                                                  | examples per row  |
|-----------------|------------------------------------------------------------------|-------------------|
| `alpaca`        | `instruction`, `input` (optional), `output`                      | 1                 |
| `dolly`         | `instruction`, `context` (optional), `response`                  | 1                 |
| `self-instruct` | `instruction`, `instances` = [{`input`, `output`}, ...]          | one per instance  |
| `messages`      | `messages` = [{`role`: system/user/assistant, `content`}, ...]   | 1                 |
| `oasst1`        | Guanaco `input` ("### Human: ... ### Assistant:") + `output`     | 1                 |
|                 | or a whole Guanaco dialogue in `text`                            | 1                 |
|                 | or OASST message trees: `message_id`, `parent_id`, `role`, `text`| see `oasst.py`    |
| `text`          | `text` (or a `.txt` file)                                        | 1 document        |
| `preference`    | `prompt` (or `messages`), `chosen`, `rejected` (`preference.py`) | 1 pair            |

Detection, first match wins: `.txt` -> text; `chosen` + `rejected` + (`prompt` or `messages`) ->
preference; `messages` -> messages; `message_id` + `parent_id` + `role`
+ `text` -> oasst1 trees; `instruction` + `instances` -> self-instruct; `instruction` + `response` ->
dolly; `instruction` + `output` -> alpaca; `input` + `output` with the first `input` starting with
`### Human:` -> oasst1; `text` -> oasst1 if it starts with `### Human:`, else text. An explicit format
overrides detection; fields it needs that the file lacks fail at row 1 with the detected format as a hint.

The canonical example is a conversation: a tuple of `Turn(role, content)` with roles system / user /
assistant, an optional system turn first, then user and assistant alternating, ending with an
assistant turn. Single-turn formats become `[user, assistant]`; the instruction formats keep their
`input`/`context` in `Example.context` for the Alpaca prompt's `### Input:` section. Text documents
carry `Example.text` and no turns.

Every malformed row raises `DataError("<file>:<row>: field '<name>': <problem>")` (list items are
named with 0-based indexes, `messages[2].role`), so all data is validated before tokenization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qlorakit.data.oasst import guanaco_row, tree_examples
from qlorakit.data.preference import (
    PREFERENCE_FIELDS,
    is_preference,
    preference_row,
    required_preference_fields,
)
from qlorakit.data.readers import Table, read_table
from qlorakit.data.schema import ROLES, Conversion, Example, Row, Turn, check_turns
from qlorakit.errors import DataError

FORMATS = ("alpaca", "dolly", "oasst1", "messages", "self-instruct", "text", "preference")
GUANACO_HUMAN_MARK = "### Human:"
TREE_FIELDS = ("message_id", "parent_id", "role", "text")
EXPECTED_FIELDS = {
    "alpaca": "instruction, input (optional), output",
    "dolly": "instruction, context (optional), response",
    "self-instruct": "instruction, instances [{input, output}]",
    "messages": "messages [{role, content}]",
    "oasst1": "input ('### Human: ... ### Assistant:') + output, or text, or message_id/parent_id/role/text",
    "text": "text",
    "preference": PREFERENCE_FIELDS,
}


def single_turn(fmt: str, row: Row, prompt: str, answer: str, context: str = "") -> Example:
    return Example(fmt, row.where, (Turn("user", prompt), Turn("assistant", answer)), context=context)


def alpaca_row(row: Row) -> list[Example]:
    instruction, context = row.text("instruction"), row.text("input", required=False)
    return [single_turn("alpaca", row, instruction, row.text("output"), context)]


def dolly_row(row: Row) -> list[Example]:
    instruction, context = row.text("instruction"), row.text("context", required=False)
    return [single_turn("dolly", row, instruction, row.text("response"), context)]


def self_instruct_row(row: Row) -> list[Example]:
    instruction = row.text("instruction")
    examples = []
    for i, item in enumerate(row.items("instances")):
        name = f"instances[{i}]"
        item = row.mapping(name, item)
        context = row.text(f"{name}.input", required=False, value=item.get("input"), from_row=False)
        answer = row.text(f"{name}.output", value=item.get("output"), from_row=False)
        examples.append(single_turn("self-instruct", row, instruction, answer, context))
    return examples


def messages_row(row: Row) -> list[Example]:
    turns = []
    for i, message in enumerate(row.items("messages")):
        name = f"messages[{i}]"
        message = row.mapping(name, message)
        role = row.text(f"{name}.role", value=message.get("role"), from_row=False)
        if role not in ROLES:
            row.fail(f"{name}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        turns.append(Turn(role, row.text(f"{name}.content", value=message.get("content"), from_row=False)))
    check_turns(row, turns, "messages")
    return [Example("messages", row.where, tuple(turns))]


def text_row(row: Row) -> list[Example]:
    return [Example("text", row.where, text=row.text("text"))]


def detect_format(columns: Sequence[str], first_row: dict[str, Any], kind: str = "") -> str | None:
    """The format implied by a file's fields (and its first row for the Guanaco text), or None."""
    cols = set(columns)
    if kind == "txt":
        return "text"
    if is_preference(cols):
        return "preference"
    if "messages" in cols:
        return "messages"
    if set(TREE_FIELDS) <= cols:
        return "oasst1"
    if {"instruction", "instances"} <= cols:
        return "self-instruct"
    if {"instruction", "response"} <= cols:
        return "dolly"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"input", "output"} <= cols and _starts_guanaco(first_row.get("input")):
        return "oasst1"
    if "text" in cols:
        return "oasst1" if _starts_guanaco(first_row.get("text")) else "text"
    return None


def _starts_guanaco(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith(GUANACO_HUMAN_MARK)


def required_fields(fmt: str, columns: Sequence[str]) -> tuple[str, ...]:
    """The fields an explicit ``fmt`` needs that every row must be able to have."""
    if fmt == "oasst1":
        if "role" in columns:
            return TREE_FIELDS
        return ("input", "output") if "input" in columns or "output" in columns else ("text",)
    if fmt == "preference":
        return required_preference_fields(columns)
    return {
        "alpaca": ("instruction", "output"),
        "dolly": ("instruction", "response"),
        "self-instruct": ("instruction", "instances"),
        "messages": ("messages",),
        "text": ("text",),
    }[fmt]


ROW_CONVERTERS: dict[str, Callable[[Row], list[Example]]] = {
    "alpaca": alpaca_row,
    "dolly": dolly_row,
    "self-instruct": self_instruct_row,
    "messages": messages_row,
    "text": text_row,
    "preference": preference_row,
}


def convert_table(table: Table, fmt: str = "auto") -> Conversion:
    """Validate and convert every row of ``table``; ``fmt`` "auto" detects it from the fields."""
    detected = detect_format(table.columns, table.rows[0], table.kind)
    if fmt == "auto":
        if detected is None:
            raise DataError(f"{table.path}: cannot tell the data format from the fields {list(table.columns)}; "
                            f"known formats and their fields: {_known()}; or pass an explicit format")
        fmt = detected
    _check_explicit(table, fmt, detected)
    if fmt == "text" and table.kind == "txt":
        return Conversion(table.path, "text", 1, [Example("text", table.where(0), text=table.rows[0]["text"])])
    if fmt == "oasst1" and "role" in table.columns:
        examples, dropped = tree_examples(table)
        return Conversion(table.path, fmt, len(table.rows), examples, dropped)
    convert = guanaco_row if fmt == "oasst1" else ROW_CONVERTERS[fmt]
    examples = []
    for i, values in enumerate(table.rows):
        examples.extend(convert(Row(values, table.where(i))))
    return Conversion(table.path, fmt, len(table.rows), examples)


def _known() -> str:
    return "; ".join(f"{name} ({fields})" for name, fields in EXPECTED_FIELDS.items())


def _check_explicit(table: Table, fmt: str, detected: str | None) -> None:
    """An explicit format the file's fields do not fit fails once, at its first row, with a hint."""
    if fmt not in FORMATS:
        raise DataError(f"{table.path}: unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if table.kind == "txt":
        if fmt != "text":
            raise DataError(f"{table.path}: a .txt file is plain text (format 'text'), not {fmt!r}; "
                            "structured formats need JSON, JSONL, CSV or Parquet rows")
        return
    missing = [name for name in required_fields(fmt, table.columns) if name not in table.columns]
    if missing:
        hint = f"; these fields look like format {detected!r}" if detected and detected != fmt else ""
        raise DataError(f"{table.where(0)}: field '{missing[0]}': missing; format {fmt!r} expects "
                        f"{EXPECTED_FIELDS[fmt]}, the file has {', '.join(table.columns)}{hint}")


def load_examples(paths: Sequence[str | Path], fmt: str = "auto") -> list[Conversion]:
    """Read and validate every file (all of them, before any tokenization); one Conversion per file."""
    if not paths:
        raise DataError("no data files given; pass at least one path (JSON, JSONL, CSV, Parquet or TXT)")
    return [convert_table(read_table(path), fmt) for path in paths]
