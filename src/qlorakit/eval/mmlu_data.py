"""MMLU files and prompts: read a subject's CSV in either dialect and build the standard k-shot prompt.

Layout (the original release): ``DIR/dev/<subject>_dev.csv`` holds the few-shot examples and
``DIR/test/<subject>_test.csv`` the questions. Each CSV record has six fields, question, four choices,
answer. Two dialects are read, detected per file:

- the original release: no header row, the answer a letter ``A``-``D``;
- a header row ``question,choice0,choice1,choice2,choice3,answer``, the answer a 0-based index ``0``-``3``.

Quoted fields may hold newlines, so files are parsed with ``csv`` (``newline=""``), never split on lines.
A file that is not UTF-8 or not CSV (a field above ``csv.field_size_limit()``, 128 KiB) fails with
``DataError`` naming the row and line.

Prompt (Hendrycks et al., 2021; subject underscores become spaces)::

    The following are multiple choice questions (with answers) about <subject>.\\n\\n
    <k dev examples, each "Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n">
    <test question "Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:">

The original harness writes two spaces after "about"; this module writes one (as the spec of
``qlorakit eval mmlu`` and lm-evaluation-harness do).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from qlorakit.errors import DataError
from qlorakit.untrusted import decode_utf8

LETTERS = ("A", "B", "C", "D")
HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
DEV_SUFFIX, TEST_SUFFIX = "_dev.csv", "_test.csv"


@dataclass(frozen=True)
class Question:
    """One MMLU item: the question, its four choices and the index (0-3) of the right one."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int
    where: str  # "<file>: row <n>" for messages


def _answer_index(text: str, where: str) -> int:
    value = text.strip()
    if value.upper() in LETTERS:
        return LETTERS.index(value.upper())
    if value in ("0", "1", "2", "3"):
        return int(value)
    raise DataError(f"{where}: answer {text!r} is not a letter A-D or an index 0-3; fix the answer column (field 6)")


def read_questions(path: str | Path) -> list[Question]:
    """All rows of one MMLU CSV (either dialect); DataError names the file and the row at fault."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such MMLU file")
    text = decode_utf8(path.read_bytes(), str(path), DataError)
    questions = []
    for number, record in _records(text, path):
        where = f"{path}: row {number}"
        if number == 1 and tuple(f.strip().lower() for f in record) == HEADER:
            continue
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # a blank line
        if len(record) != 6:
            raise DataError(f"{where}: {len(record)} fields, expected 6 (question, 4 choices, answer); "
                            "quote fields that contain commas")
        questions.append(Question(record[0], tuple(record[1:5]), _answer_index(record[5], where), where))
    if not questions:
        raise DataError(f"{path}: no questions in the file")
    return questions


def _records(text: str, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(record number, fields)`` of CSV ``text``; a malformed record raises DataError with its line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    number = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}: row {number + 1} (line {reader.line_num}): not valid CSV ({exc})") from None
        number += 1
        yield number, record


def subject_name(path: Path, suffix: str) -> str:
    return path.name[: -len(suffix)]


def subject_files(directory: str | Path, subjects: Sequence[str] | None = None) -> dict[str, Path]:
    """``{subject: test file}`` of ``DIR/test`` (sorted), restricted to ``subjects`` when given."""
    test_dir = Path(directory) / "test"
    if not test_dir.is_dir():
        raise DataError(f"{directory}: no test/ folder; expected the MMLU layout DIR/test/<subject>_test.csv "
                        "and DIR/dev/<subject>_dev.csv")
    found = {subject_name(p, TEST_SUFFIX): p for p in sorted(test_dir.glob("*" + TEST_SUFFIX))}
    if not found:
        raise DataError(f"{test_dir}: no <subject>_test.csv files")
    if subjects:
        unknown = [s for s in subjects if s not in found]
        if unknown:
            raise DataError(f"{test_dir}: no test file for subject(s) {unknown}; available: {sorted(found)}")
        return {s: found[s] for s in subjects}
    return found


def dev_file(directory: str | Path, subject: str) -> Path:
    """The few-shot file of ``subject``; DataError when it is missing."""
    path = Path(directory) / "dev" / f"{subject}{DEV_SUFFIX}"
    if not path.is_file():
        raise DataError(f"{path}: missing few-shot file for test subject {subject!r}; add it or use --shots 0")
    return path


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(question: Question, with_answer: bool) -> str:
    """``Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (+ `` X\\n\\n`` for a few-shot example)."""
    choices = zip(LETTERS, question.choices, strict=True)
    text = question.question + "".join(f"\n{letter}. {choice}" for letter, choice in choices)
    text += "\nAnswer:"
    return text + f" {LETTERS[question.answer]}\n\n" if with_answer else text


def few_shot_prefix(subject: str, examples: Sequence[Question]) -> str:
    """The header and the examples: the part of the prompt every question of the subject shares."""
    return header(subject) + "".join(format_question(q, with_answer=True) for q in examples)
