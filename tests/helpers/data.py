"""Helpers for the data tests: write small data files and read back the answer tokens of an example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IGNORE = -100


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def label_runs(tokenizer: Any, example: dict[str, list[int]]) -> list[str]:
    """Decoded runs of consecutive tokens that carry a label (the trained-on text)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE
    return [tokenizer.decode(run) for run in runs]


def masked_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    """Decoded tokens without a label (the prompt side)."""
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    return tokenizer.decode([t for t, lab in pairs if lab == IGNORE])
