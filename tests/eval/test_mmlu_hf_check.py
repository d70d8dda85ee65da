"""``qlorakit eval mmlu`` on SmolLM2 (fp32, 5-shot) predicts exactly what plain transformers predicts.

The check side uses no qlorakit code: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` in
fp32, this file's own CSV reading and prompt text, one full forward per prompt and the argmax over the
logits of the tokens of " A".." D" at the last position. Two subjects with short prompts, 2-shot, first 3
questions each (all prompts fit 2048 tokens, so no example is dropped on either side). The 5-shot check
on more subjects is in benchmarks/mmlu_smollm2.py.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from qlorakit.cli.main import main

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBJECTS = ("world_religions", "conceptual_physics")
LIMIT, SHOTS = 3, 2  # kept small: loading the GGUF in transformers alone costs ~12 s of CPU


def _csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[1:] if rows[0][0] == "question" else rows


def _block(row, answered):
    key = row[5]
    letter = "ABCD"[int(key)] if key in "0123" else key
    text = row[0] + "".join(f"\n{c}. {t}" for c, t in zip("ABCD", row[1:5], strict=True)) + "\nAnswer:"
    return text + f" {letter}\n\n" if answered else text


def _plain_transformers(mmlu_dir, model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=GGUF, dtype=torch.float32).eval()
    choices = [tokenizer.encode(" " + c, add_special_tokens=False)[0] for c in "ABCD"]
    found = {}
    for subject in SUBJECTS:
        shots = "".join(_block(r, True) for r in _csv(mmlu_dir / "dev" / f"{subject}_dev.csv")[:SHOTS])
        intro = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        found[subject] = ""
        for row in _csv(mmlu_dir / "test" / f"{subject}_test.csv")[:LIMIT]:
            inputs = tokenizer(intro + shots + _block(row, False), return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1, choices]
            found[subject] += "ABCD"[int(logits.argmax())]
    return found


@pytest.mark.slow
def test_fp32_mmlu_predictions_equal_plain_transformers_question_by_question(shared_dir, smol_tokenizer, tmp_path):
    mmlu_dir, model_dir = shared_dir / "data" / "mmlu", shared_dir / "models" / "smollm2-135m-instruct"
    out = tmp_path / "mmlu.json"
    assert main(["eval", "mmlu", "--model", str(model_dir / GGUF), "--no-quantize", "--data", str(mmlu_dir),
                 "--subjects", *SUBJECTS, "--limit", str(LIMIT), "--shots", str(SHOTS), "--batch-size", "3",
                 "--output", str(out), "--no-progress"]) == 0
    ours = json.loads(out.read_text())["details"]
    assert all(ours[s]["fewer_shots"] == 0 and ours[s]["total"] == LIMIT for s in SUBJECTS)
    assert {s: ours[s]["predictions"] for s in SUBJECTS} == _plain_transformers(mmlu_dir, model_dir, smol_tokenizer)
