"""Generation requests from the command line or a JSON Lines file, validated before any model is loaded.

A prompt file has one JSON object per line with the prompt under ``prompt`` (a string) or ``turns`` (a
list of strings, MT-Bench style; the first turn is used), and optionally ``adapter``: the adapter name
that request uses (``"base"`` for none). Blank lines are skipped; every error names ``file:line`` and the
field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlorakit.errors import DataError


@dataclass(frozen=True)
class Request:
    """One prompt and the adapter it asks for (``None``: the session's default)."""

    prompt: str
    adapter: str | None = None
    where: str = "--prompt"


def _prompt_of(row: dict, where: str) -> str:
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
        return prompt
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip():
        return turns[0]
    if "turns" in row:
        raise DataError(f"{where}: field 'turns' must be a non-empty list of strings, got {turns!r}")
    raise DataError(f"{where}: no 'prompt' (string) or 'turns' (list of strings) field; fields: {sorted(row)}")


def read_prompt_file(path: str | Path) -> list[Request]:
    """Every request of a JSON Lines prompt file (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--prompts {file}: no such file")
    requests = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(row).__name__}")
        adapter = row.get("adapter")
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise DataError(f"{where}: field 'adapter' must be an adapter name (string), got {adapter!r}")
        requests.append(Request(_prompt_of(row, where), adapter, where))
    if not requests:
        raise DataError(f"--prompts {file}: the file holds no prompts")
    return requests
