"""Fixtures for trainer tests: the real SmolLM2 tokenizer and a small OASST1 file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tokenizer(shared_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_dir / "models" / "smollm2-135m-instruct"), gguf_file=GGUF)


@pytest.fixture
def small_oasst(shared_dir: Path, tmp_path: Path) -> Path:
    """The 14 shortest single-turn rows of the shared OASST1 validation file, as a JSONL file."""
    rows = [json.loads(line) for line in (shared_dir / "data" / "oasst1" / "oasst1_guanaco_val.jsonl").open()]
    rows = sorted((r for r in rows if r["input"].count("### Human:") == 1),
                  key=lambda r: len(r["input"]) + len(r["output"]))
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
    return path
