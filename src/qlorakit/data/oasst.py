"""OASST1 (OpenAssistant) data in its two shapes: Guanaco dialogue text and raw message trees.

Guanaco text (the QLoRA paper's OA format, e.g. ``eval/prompts/oa_questions.jsonl`` of artidoro/qlora):
a row has ``input`` = ``"### Human: q1 ### Assistant: a1 ### Human: q2 ### Assistant:"`` and ``output`` =
the reply to the last human turn, or a whole dialogue in ``text`` (the openassistant-guanaco dataset)
ending with an assistant reply. Turns are split at ``### Human:`` / ``### Assistant:`` and stripped;
text before the first marker becomes a system turn.

Message trees (the raw OASST1 export): rows with ``message_id``, ``parent_id`` (empty/null for a root),
``role`` (``prompter`` or ``assistant``) and ``text``. Every root-to-leaf path is one conversation,
cut after its last assistant message (a prompter leaf has no answer to train on); paths that coincide
after the cut are built once. So the conversations end exactly at the assistant messages that have no
assistant reply below them. A tree whose root prompt never got a reply is dropped and counted.
"""

from __future__ import annotations

import re
from typing import Any

from qlorakit.data.readers import Table
from qlorakit.data.schema import Example, Row, Turn

MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")
TREE_ROLES = {"prompter": "user", "assistant": "assistant"}
NO_REPLY = "OASST tree whose root prompt has no assistant reply"


def guanaco_row(row: Row) -> list[Example]:
    """One conversation from Guanaco ``input`` + ``output``, or from a whole dialogue in ``text``."""
    if "input" in row.values or "output" in row.values:
        turns = parse_dialogue(row, "input", row.text("input"), open_end=True)
        turns.append(Turn("assistant", row.text("output")))
    else:
        turns = parse_dialogue(row, "text", row.text("text"), open_end=False)
    return [Example("oasst1", row.where, tuple(turns))]


def parse_dialogue(row: Row, name: str, dialogue: str, open_end: bool) -> list[Turn]:
    """Split ``### Human: ... ### Assistant: ...`` into turns; ``open_end``: ends with an empty Assistant."""
    parts = MARKER.split(dialogue)
    if len(parts) == 1:
        row.fail(name, "no '### Human:' turn found; the oasst1 text format is '### Human: ... ### Assistant: ...'")
    turns = [Turn("system", parts[0].strip())] if parts[0].strip() else []
    marks = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    for n, (mark, content) in enumerate(marks):
        expected = "Human" if n % 2 == 0 else "Assistant"
        if mark != expected:
            row.fail(name, f"turn {n + 1} is '### {mark}:' but '### {expected}:' was expected; turns must alternate")
        last = n == len(marks) - 1
        if last and open_end:
            if mark != "Assistant" or content:
                row.fail(name, "must end with '### Assistant:' (the reply belongs in 'output')")
            continue
        if not content:
            row.fail(name, f"turn {n + 1} ('### {mark}:') is empty")
        turns.append(Turn("user" if mark == "Human" else "assistant", content))
    if not open_end and marks[-1][0] != "Assistant":
        row.fail(name, "the dialogue must end with an '### Assistant:' reply (the answer to train on)")
    return turns


def tree_examples(table: Table) -> tuple[list[Example], dict[str, int]]:
    """Every root-to-leaf conversation of the message trees in ``table`` (see the module docstring)."""
    rows = [Row(values, table.where(i)) for i, values in enumerate(table.rows)]
    index = _index_messages(rows)
    children: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    roots = []
    for i, row in enumerate(rows):
        parent = _parent_of(row, index)
        if parent is None:
            roots.append(i)
        else:
            children[parent].append(i)
    _check_tree(rows, roots, children)
    ends = [i for i, row in enumerate(rows) if _is_end(i, rows, children)]
    parents = {child: i for i, kids in children.items() for child in kids}
    examples = [Example("oasst1", rows[end].where, tuple(_path(end, rows, parents))) for end in ends]
    unanswered = sum(1 for r in roots if not any(_role(rows[c]) == "assistant" for c in children[r]))
    return examples, ({NO_REPLY: unanswered} if unanswered else {})


def _index_messages(rows: list[Row]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, row in enumerate(rows):
        message_id = row.text("message_id")
        if message_id in index:
            row.fail("message_id", f"duplicate id {message_id!r}, first used at {rows[index[message_id]].where}")
        index[message_id] = i
        role = row.text("role")
        if role not in TREE_ROLES:
            row.fail("role", f"unknown role {role!r}; OASST messages are 'prompter' or 'assistant'")
        row.text("text")
    return index


def _parent_of(row: Row, index: dict[str, int]) -> int | None:
    parent: Any = row.values.get("parent_id")
    if parent is None or parent == "":
        return None
    parent = row.text("parent_id")
    if parent not in index:
        row.fail("parent_id", f"no message has id {parent!r} in this file")
    return index[parent]


def _role(row: Row) -> str:
    return str(row.values["role"])


def _check_tree(rows: list[Row], roots: list[int], children: dict[int, list[int]]) -> None:
    """Roots are prompts, roles alternate down the tree, and every message hangs below a root."""
    seen: set[int] = set()
    stack = list(roots)
    for root in roots:
        if _role(rows[root]) != "prompter":
            rows[root].fail("role", "a root message (no parent_id) must be a 'prompter' message")
    while stack:
        node = stack.pop()
        seen.add(node)
        for child in children[node]:
            if _role(rows[child]) == _role(rows[node]):
                rows[child].fail("role", f"a '{_role(rows[child])}' message replies to a '{_role(rows[node])}' "
                                 f"message ({rows[node].where}); prompter and assistant must alternate")
            stack.append(child)
    for i, row in enumerate(rows):
        if i not in seen:
            row.fail("parent_id", "the parent chain never reaches a root message (a cycle)")


def _is_end(i: int, rows: list[Row], children: dict[int, list[int]]) -> bool:
    """An assistant message with no assistant reply below it ends a conversation."""
    if _role(rows[i]) != "assistant":
        return False
    return not any(children[prompt] for prompt in children[i])


def _path(end: int, rows: list[Row], parents: dict[int, int]) -> list[Turn]:
    path = [end]
    while path[-1] in parents:
        path.append(parents[path[-1]])
    return [Turn(TREE_ROLES[_role(rows[i])], rows[i].text("text")) for i in reversed(path)]
