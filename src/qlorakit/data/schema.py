"""The canonical example every data format converts to, and typed access to raw rows.

A conversation is a tuple of ``Turn(role, content)`` with roles system / user / assistant: an optional
system turn first, then user and assistant alternating, ending with an assistant turn (the answer to
train on). Instruction formats keep their ``input``/``context`` in ``Example.context``; text documents
carry ``Example.text`` and no turns. ``Row`` reads one raw row's fields and fails with
``DataError("<file>:<row>: field '<name>': <problem>")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from qlorakit.errors import DataError

ROLES = ("system", "user", "assistant")
INSTRUCTION_FORMATS = ("alpaca", "dolly", "self-instruct")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``role`` is system, user or assistant."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One canonical training example and where it came from (``<file>:<row>``)."""

    format: str
    origin: str
    turns: tuple[Turn, ...] = ()
    context: str = ""
    text: str = ""
    rejected: tuple[Turn, ...] = ()  # preference rows: the rejected conversation (``turns`` is the chosen one)
    prompt_turns: int = 0  # preference rows: how many leading turns both conversations share (the prompt)

    @property
    def is_text(self) -> bool:
        return self.format == "text"

    @property
    def is_preference(self) -> bool:
        return self.format == "preference"

    @property
    def is_instruction(self) -> bool:
        return self.format in INSTRUCTION_FORMATS


@dataclass
class Conversion:
    """The examples of one file, with its format and the examples dropped on purpose (by reason)."""

    path: str
    format: str
    rows: int
    examples: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)


class Row:
    """One raw row with typed field access; every failure names file, row and field."""

    def __init__(self, values: dict[str, Any], where: str) -> None:
        self.values, self.where = values, where

    def fail(self, name: str, problem: str) -> NoReturn:
        raise DataError(f"{self.where}: field '{name}': {problem}")

    def text(self, name: str, required: bool = True, value: Any = None, from_row: bool = True) -> str:
        """A string field; missing/None is ``""`` when optional; a required one must not be blank."""
        value = self.values.get(name) if from_row else value
        if value is None:
            if required:
                self.fail(name, "missing")
            return ""
        if not isinstance(value, str):
            self.fail(name, f"expected a string, got {type(value).__name__} {_short(value)}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a JSON escape such as "\ud800": no tokenizer takes it
                self.fail(name, f"not valid Unicode (a lone surrogate at character {exc.start})")
        if required and not value.strip():
            self.fail(name, "empty")
        return value

    def items(self, name: str, value: Any = None, from_row: bool = True) -> list[Any]:
        """A non-empty list field."""
        value = self.values.get(name) if from_row else value
        if value is None:
            self.fail(name, "missing")
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {type(value).__name__} {_short(value)}")
        if not value:
            self.fail(name, "empty list")
        return value

    def mapping(self, name: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(name, f"expected an object with named fields, got {type(value).__name__} {_short(value)}")
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_turns(row: Row, turns: Sequence[Turn], name: str) -> None:
    """An optional system turn first, then user/assistant alternating, ending with an assistant."""
    expected = "user"
    for i, turn in enumerate(turns):
        if turn.role == "system":
            if i != 0:
                row.fail(f"{name}[{i}].role", "a 'system' message is only allowed as the first message")
            continue
        if turn.role != expected:
            after = f"after '{turns[i - 1].role}'" if i else "as the first non-system message"
            row.fail(f"{name}[{i}].role",
                     f"expected '{expected}' {after}, got '{turn.role}'; user and assistant must alternate")
        expected = "assistant" if expected == "user" else "user"
    if not turns or turns[-1].role != "assistant":
        row.fail(name, "the conversation must end with an 'assistant' message (the answer to train on)")
