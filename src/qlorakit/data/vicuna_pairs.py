"""Preference pairs from the QLoRA paper's GPT-4 judgements of the Vicuna benchmark (``../shared/data/elo``).

Inputs (the folder's README describes them): ``vicuna_questions.jsonl`` (80 questions), the 56 three-class
judgement files ``vicuna-gpt4-pairwise/<A>-vs-<B>-gpt-4-reviewer-threeclass.jsonl`` (answer 1 is system A's;
``score`` 1 = A better, 2 = B better, 3 = tie, -1 = unparsed) and the judged answers in ``vicuna-generations/``:
the four baselines (``answer-gpt4`` -> ``answer_gpt4.jsonl``, ...) by ``answer_id``, the Guanaco models by
``question_id`` (their ``generation_truncated``, the answer cut before the model writes the next user turn).

Every unordered pair of systems is judged in both presentation orders, and GPT-4 favours the answer it reads
first. The two verdicts on one (question, system X, system Y) are therefore combined: each decisive verdict is a
vote, a tie or an unparsed verdict is none, and the pair is kept when the votes do not cancel (2-0 or 1-0). Ties
and unparsed verdicts are counted at the verdict level; pairs left with no vote or with 1-1 are counted as
dropped. Rows: ``prompt`` (the question), ``chosen``, ``rejected``, and ``question_id``, ``category``,
``chosen_system``, ``rejected_system``, ``votes`` for the record. ``per_question`` keeps at most that many
pairs of each question (a seeded choice), for short runs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qlorakit.errors import DataError

PAIRWISE_DIR = "vicuna-gpt4-pairwise"
GENERATIONS_DIR = "vicuna-generations"
QUESTIONS_FILE = "vicuna_questions.jsonl"
JUDGEMENT_SUFFIX = "-gpt-4-reviewer-threeclass.jsonl"
VERDICTS = {1: "first better", 2: "second better", 3: "tie", -1: "unparsed"}


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: missing; the Vicuna judgement folder needs it (see its README.md)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: a row must be a JSON object")
        rows.append(row)
    return rows


def _field(row: dict[str, Any], name: str, where: str, kind: type) -> Any:
    value = row.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field '{name}': expected {kind.__name__}, got {type(value).__name__}")
    return value


def _answers(elo_dir: Path, system: str) -> dict[Any, str]:
    """System ``system``'s answers: by ``answer_id`` (baselines) or by ``question_id`` (Guanaco)."""
    if system.startswith("answer-"):
        path = elo_dir / GENERATIONS_DIR / (system.replace("-", "_", 1) + ".jsonl")
        return {r["answer_id"]: _field(r, "text", f"{path}", str) for r in _rows(path)}
    path = elo_dir / GENERATIONS_DIR / f"{system}.jsonl"
    return {r["question_id"]: _field(r, "generation_truncated" if "generation_truncated" in r else "generation",
                                     f"{path}", str) for r in _rows(path)}


def build_vicuna_pairs(elo_dir: str | Path, per_question: int = 0, seed: int = 0
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(preference rows, counts) from the judgement folder; see the module docstring."""
    elo_dir = Path(elo_dir)
    files = sorted((elo_dir / PAIRWISE_DIR).glob(f"*-vs-*{JUDGEMENT_SUFFIX}"))
    if not files:
        raise DataError(f"{elo_dir / PAIRWISE_DIR}: no '<A>-vs-<B>{JUDGEMENT_SUFFIX}' files; pass the folder that "
                        "holds vicuna-gpt4-pairwise/ (../shared/data/elo)")
    questions = {_field(r, "question_id", QUESTIONS_FILE, int): r for r in _rows(elo_dir / QUESTIONS_FILE)}
    answers: dict[str, dict[Any, str]] = {}
    verdicts: Counter[str] = Counter()
    votes: dict[tuple[int, str, str], list[str]] = {}  # (question, X, Y) with X < Y -> winners
    texts: dict[tuple[int, str], str] = {}
    for path in files:
        first, second = path.name[: -len(JUDGEMENT_SUFFIX)].split("-vs-", 1)
        for system in (first, second):
            answers.setdefault(system, _answers(elo_dir, system))
        for number, row in enumerate(_rows(path), start=1):
            where = f"{path}:{number}"
            qid, score = _field(row, "question_id", where, int), _field(row, "score", where, int)
            if score not in VERDICTS or qid not in questions:
                raise DataError(f"{where}: field '{'score' if score not in VERDICTS else 'question_id'}': "
                                f"unexpected value ({score if score not in VERDICTS else qid})")
            verdicts[VERDICTS[score]] += 1
            for system, key in ((first, "answer1_id"), (second, "answer2_id")):
                found = answers[system].get(row.get(key)) or answers[system].get(qid)
                if found is None:
                    raise DataError(f"{where}: field '{key}': no answer of {system} for question {qid}")
                texts[(qid, system)] = found
            x, y = sorted((first, second))
            winners = votes.setdefault((qid, x, y), [])
            if score in (1, 2):
                winners.append(first if score == 1 else second)
    rows, dropped = _pairs(votes, texts, questions)
    kept = _per_question(rows, per_question, seed)
    counts = {"judgement_files": len(files), "judgements": sum(verdicts.values()), "verdicts": dict(verdicts),
              "dropped_verdicts": {"tie": verdicts["tie"], "unparsed": verdicts["unparsed"]},
              "system_pairs": len(votes), "dropped_pairs": dropped, "pairs": len(rows),
              "written": len(kept), "per_question": per_question, "questions": len({r["question_id"] for r in kept})}
    return kept, counts


def _pairs(votes, texts, questions) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows, dropped = [], Counter()
    for (qid, x, y), winners in sorted(votes.items()):
        tally = Counter(winners)
        if not winners:
            dropped["no decisive verdict (ties / unparsed)"] += 1
            continue
        if tally[x] == tally[y]:
            dropped["the two presentation orders disagree"] += 1
            continue
        win, lose = (x, y) if tally[x] > tally[y] else (y, x)
        rows.append({"prompt": questions[qid]["text"], "chosen": texts[(qid, win)], "rejected": texts[(qid, lose)],
                     "question_id": qid, "category": questions[qid].get("category", ""), "chosen_system": win,
                     "rejected_system": lose, "votes": f"{tally[win]}-{tally[lose]}"})
    return rows, dict(dropped)


def _per_question(rows: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    if limit <= 0:
        return rows
    rng = np.random.default_rng([seed % 2**63, 0x70616972])  # "pair"
    by_question: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_question.setdefault(row["question_id"], []).append(i)
    keep = sorted(int(i) for idx in by_question.values() for i in rng.permutation(idx)[:limit])
    return [rows[i] for i in keep]
