"""The ``preference`` format: a prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer.

| fields of a row                                   | prompt                      | chosen / rejected              |
|---------------------------------------------------|-----------------------------|--------------------------------|
| ``prompt``, ``chosen``, ``rejected`` (strings)    | one user turn               | one assistant turn each        |
| ``messages``, ``chosen``, ``rejected``            | the conversation so far     | strings, or message lists      |
| ``prompt`` as a message list (TRL's layout)       | those messages              | strings, or message lists      |

A message is ``{"role", "content"}`` with roles system / user / assistant. The prompt must end with a user
turn and a completion (``chosen`` or ``rejected``) must start with an assistant turn, so that prompt +
completion is a valid conversation (``schema.check_turns``). Only the completion's assistant turns are
scored by DPO / ORPO; assistant turns inside the prompt are context. The canonical ``Example`` holds the
chosen conversation in ``turns``, the rejected one in ``rejected``, and the number of prompt turns in
``prompt_turns``. Every malformed row fails with ``<file>:<row>: field '<name>': <problem>``.
"""

from __future__ import annotations

from typing import Any

from qlorakit.data.schema import ROLES, Example, Row, Turn, check_turns

PREFERENCE_FIELDS = "prompt (or messages), chosen, rejected: strings or [{role, content}] lists"


def is_preference(columns: set[str]) -> bool:
    """Whether a file's fields are the preference format's."""
    return {"chosen", "rejected"} <= columns and bool({"prompt", "messages"} & columns)


def required_preference_fields(columns: tuple[str, ...]) -> tuple[str, ...]:
    return ("messages" if "messages" in columns and "prompt" not in columns else "prompt", "chosen", "rejected")


def preference_row(row: Row) -> list[Example]:
    """One row -> one Example carrying both conversations (see the module docstring)."""
    if row.values.get("prompt") is not None and row.values.get("messages") is not None:
        row.fail("messages", "give the prompt once: either 'prompt' or 'messages', not both")
    name = "messages" if row.values.get("prompt") is None and "messages" in row.values else "prompt"
    prompt = _turns(row, name, "user")
    if prompt[-1].role != "user":
        row.fail(name, f"the prompt must end with a 'user' message, got '{prompt[-1].role}'")
    chosen, rejected = _turns(row, "chosen", "assistant"), _turns(row, "rejected", "assistant")
    for field_name, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[0].role != "assistant":
            row.fail(f"{field_name}[0].role", f"a completion must start with an 'assistant' message, "
                                              f"got '{completion[0].role}'")
        check_turns(row, [*prompt, *completion], f"{name}+{field_name}")
    return [Example("preference", row.where, tuple(prompt + chosen), rejected=tuple(prompt + rejected),
                    prompt_turns=len(prompt))]


def _turns(row: Row, name: str, string_role: str) -> list[Turn]:
    """A string field as one turn of ``string_role``, or a message list as its turns."""
    value = row.values.get(name)
    if isinstance(value, str) or value is None:
        return [Turn(string_role, row.text(name))]
    turns = []
    for i, message in enumerate(row.items(name)):
        turns.append(_message(row, f"{name}[{i}]", message))
    return turns


def _message(row: Row, name: str, message: Any) -> Turn:
    message = row.mapping(name, message)
    role = row.text(f"{name}.role", value=message.get("role"), from_row=False)
    if role not in ROLES:
        row.fail(f"{name}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return Turn(role, row.text(f"{name}.content", value=message.get("content"), from_row=False))
