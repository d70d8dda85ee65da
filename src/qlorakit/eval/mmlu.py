"""MMLU accuracy (Hendrycks et al., 2021), zero- or k-shot, scored by the logits of the answer letters.

For each test question the prompt is the subject header, the first k dev examples of the subject and the
question ending in ``Answer:`` (``mmlu_data``). The model's prediction is

    argmax over X in {A, B, C, D} of logit(next token = t_X | prompt)

where ``t_X`` is the token the tokenizer appends for `` X`` after ``Answer:`` (the letter with its leading
space, as the few-shot answers are written; SmolLM2's tokenizer splits ``"Answer: A"`` into ``Answer``,
``:``, `` A``). ``letter_token_ids`` derives and checks these tokens for the tokenizer at hand.

Reported: accuracy per subject, per category (correct / questions over the category's subjects, as the
original ``evaluate.py`` pools them; categories in ``mmlu_categories``), ``mean`` = the mean of the
per-subject accuracies (the paper's number), and ``accuracy_all`` = correct / questions over everything.

Prompts longer than ``max_seq_len`` tokens drop few-shot examples from the end until they fit (the original
harness's rule), counted per subject as ``fewer_shots``; a question too long even with 0 shots keeps its
last ``max_seq_len`` tokens (counted as ``cut``).

Speed: ``score_subject`` computes the few-shot prefix's keys/values once per subject (and shot count) and
runs only each question's own tokens, in padded batches (``lm_scoring``); ``score_reference`` runs each
full prompt alone through the plain ``model(...)`` forward and is the oracle the fast path is tested against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from qlorakit.errors import ConfigError, DataError
from qlorakit.eval import lm_scoring
from qlorakit.eval.mmlu_categories import CATEGORIES, SUBJECT_CATEGORY
from qlorakit.eval.mmlu_data import (
    LETTERS,
    Question,
    dev_file,
    few_shot_prefix,
    format_question,
    read_questions,
    subject_files,
)

DEFAULT_SHOTS = 5
DEFAULT_MAX_SEQ_LEN = 2048  # the original harness's limit
UNKNOWN_CATEGORY = "unknown"  # a subject outside the 57: reported, counted in no category


@dataclass
class PromptPlan:
    """One question's tokenized prompt and how many few-shot examples it kept."""

    ids: list[int]
    shots: int
    cut: bool


@dataclass
class SubjectResult:
    subject: str
    category: str
    correct: int
    total: int
    shots: int  # requested
    fewer_shots: int  # questions that had examples dropped to fit max_seq_len
    cut: int  # questions left-truncated even with 0 examples
    predictions: str  # one letter per question, in file order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass
class MmluResult:
    subjects: dict[str, SubjectResult] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """The mean of the per-subject accuracies (the MMLU paper's average)."""
        return sum(r.accuracy for r in self.subjects.values()) / len(self.subjects)

    def categories(self) -> dict[str, dict[str, float | int]]:
        """Per category: pooled accuracy, questions, subjects (categories with no subject are left out)."""
        out: dict[str, dict[str, float | int]] = {}
        for name in CATEGORIES:
            rows = [r for r in self.subjects.values() if r.category == name]
            if rows:
                correct, total = sum(r.correct for r in rows), sum(r.total for r in rows)
                out[name] = {"accuracy": correct / total, "questions": total, "subjects": len(rows)}
        return out

    def as_dict(self) -> dict[str, Any]:
        rows = self.subjects.values()
        correct, total = sum(r.correct for r in rows), sum(r.total for r in rows)
        return {
            "mean": self.mean,
            "accuracy_all": correct / total,
            "questions": total,
            "subjects": {s: r.accuracy for s, r in self.subjects.items()},
            "categories": {c: v["accuracy"] for c, v in self.categories().items()},
            "category_counts": {c: {"questions": v["questions"], "subjects": v["subjects"]}
                                for c, v in self.categories().items()},
            "details": {s: {"correct": r.correct, "total": r.total, "shots": r.shots, "fewer_shots": r.fewer_shots,
                            "cut": r.cut, "category": r.category, "predictions": r.predictions}
                        for s, r in self.subjects.items()},
        }


def letter_token_ids(tokenizer: Any) -> list[int]:
    """The token the tokenizer appends for `` X`` after ``Answer:``, for X = A..D.

    ``tokenizer("Answer: X")`` must be ``tokenizer("Answer:")`` plus exactly one token (SmolLM2: `` A`` =
    330, `` B`` = 389, `` C`` = 340, `` D`` = 422); otherwise letter scoring is undefined and ConfigError
    is raised. Sentencepiece tokenizers that split `` A`` alone into two pieces still pass this rule.
    """
    base = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer("Answer: " + letter, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ConfigError(f"tokenizer: 'Answer: {letter}' is {full}, not 'Answer:' {base} plus one token; "
                              "MMLU letter scoring needs the answer letter to be a single token after 'Answer:'")
        ids.append(full[-1])
    if len(set(ids)) != len(LETTERS):
        raise ConfigError(f"tokenizer: the answer letters map to the tokens {ids}, not four distinct ones")
    return ids


def plan_prompts(tokenizer: Any, subject: str, dev: Sequence[Question], tests: Sequence[Question], shots: int,
                 max_seq_len: int) -> list[PromptPlan]:
    """Tokenize each prompt, dropping few-shot examples from the end while it is over ``max_seq_len``."""
    plans = []
    for question in tests:
        end = format_question(question, with_answer=False)
        k = shots
        ids = tokenizer(few_shot_prefix(subject, dev[:k]) + end)["input_ids"]
        while len(ids) > max_seq_len and k > 0:
            k -= 1
            ids = tokenizer(few_shot_prefix(subject, dev[:k]) + end)["input_ids"]
        cut = len(ids) > max_seq_len
        plans.append(PromptPlan(ids[-max_seq_len:] if cut else ids, k, cut))
    return plans


def score_reference(model: Any, prompt_ids: Sequence[int], letter_ids: Sequence[int]) -> torch.Tensor:
    """Letter logits ``(4,)`` of one full prompt from the plain ``model(input_ids)`` forward (the oracle)."""
    device = model.get_output_embeddings().weight.device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt_ids)], device=device)).logits  # (1, T, vocab)
    return logits[0, -1, list(letter_ids)].float()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def score_with_prefix(model: Any, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int], batch_size: int,
                      pad_id: int = 0, side: str = "right") -> torch.Tensor:
    """Letter logits ``(n, 4)`` of prompts that share a token prefix: the prefix is run once, then batches.

    The shared prefix is the longest common token prefix of all prompts, less one token so every prompt
    keeps at least one token of its own.
    """
    shared = min(_common_prefix(prompts[0], p) for p in prompts)
    shared = min(shared, min(len(p) for p in prompts) - 1)
    device = model.get_output_embeddings().weight.device
    letters = torch.tensor(list(letter_ids), device=device)
    out = torch.empty((len(prompts), len(letter_ids)))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    with torch.no_grad():
        cache = lm_scoring.prefix_cache(model, list(prompts[0][:shared])) if shared > 0 else None
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            suffixes = [list(prompts[i][shared:]) for i in rows]
            ids, mask, positions, last = lm_scoring.pad_suffixes(suffixes, shared, pad_id, side, device)
            past = lm_scoring.expand_cache(model, cache, len(rows)) if cache is not None else None
            hidden, _ = lm_scoring.decoder_hidden(model, ids, mask, positions, past)  # (B, S, hidden)
            picked = hidden[torch.arange(len(rows), device=device), last]  # (B, hidden)
            out[rows] = lm_scoring.head_logits(model, picked)[:, letters].cpu()
    return out


def score_subject(model: Any, plans: Sequence[PromptPlan], letter_ids: Sequence[int], batch_size: int,
                  pad_id: int = 0, side: str = "right", progress: Any = None) -> torch.Tensor:
    """Letter logits ``(n, 4)`` for a subject's prompts, grouped by how many examples each kept."""
    out = torch.empty((len(plans), len(letter_ids)))
    for shots in sorted({p.shots for p in plans}, reverse=True):
        rows = [i for i, p in enumerate(plans) if p.shots == shots]
        out[rows] = score_with_prefix(model, [plans[i].ids for i in rows], letter_ids, batch_size, pad_id, side)
        if progress is not None:
            progress.update(len(rows))
    return out


def load_subjects(directory: str | os.PathLike, shots: int, limit: int | None = None,
                  subjects: Sequence[str] | None = None) -> dict[str, tuple[list[Question], list[Question]]]:
    """``{subject: (dev examples, test questions)}``, every file read and checked before any scoring."""
    if shots < 0:
        raise ConfigError(f"shots = {shots}: must be >= 0")
    loaded = {}
    for subject, path in subject_files(directory, subjects).items():
        dev = read_questions(dev_file(directory, subject)) if shots > 0 else []
        if len(dev) < shots:
            raise DataError(f"{dev_file(directory, subject)}: {len(dev)} examples, fewer than the {shots} "
                            "few-shot examples asked for; ask for fewer shots or add examples")
        tests = read_questions(path)
        loaded[subject] = (dev[:shots], tests[:limit] if limit else tests)
    return loaded


def evaluate_mmlu(model: Any, tokenizer: Any, directory: str | os.PathLike, shots: int = DEFAULT_SHOTS,
                  max_seq_len: int = DEFAULT_MAX_SEQ_LEN, batch_size: int = 8, limit: int | None = None,
                  subjects: Sequence[str] | None = None, side: str = "right", progress: bool = True) -> MmluResult:
    """Score every test subject under ``directory`` (first ``limit`` questions each when given)."""
    if max_seq_len < 8:
        raise ConfigError(f"max_seq_len = {max_seq_len}: too small for an MMLU prompt")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}: must be >= 1")
    data = load_subjects(directory, shots, limit, subjects)
    letter_ids = letter_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = MmluResult()
    bar = tqdm(total=sum(len(t) for _, t in data.values()), desc="mmlu", unit="q", disable=not progress)
    for subject, (dev, tests) in data.items():
        bar.set_postfix(subject=subject)
        plans = plan_prompts(tokenizer, subject, dev, tests, shots, max_seq_len)
        logits = score_subject(model, plans, letter_ids, batch_size, pad_id, side, progress=bar)
        predicted = logits.argmax(dim=1).tolist()
        result.subjects[subject] = SubjectResult(
            subject, SUBJECT_CATEGORY.get(subject, UNKNOWN_CATEGORY),
            sum(p == q.answer for p, q in zip(predicted, tests, strict=True)),
            len(tests), shots, sum(p.shots < shots for p in plans), sum(p.cut for p in plans),
            "".join(LETTERS[p] for p in predicted))
    bar.close()
    return result


def format_table(result: MmluResult) -> str:
    """Subjects, categories and the mean as a plain-text table (accuracies in percent)."""
    lines = [f"{'subject':<40} {'acc %':>7} {'n':>6} {'fewer':>6}"]
    for name, r in result.subjects.items():
        lines.append(f"{name:<40} {100 * r.accuracy:>7.2f} {r.total:>6} {r.fewer_shots:>6}")
    lines.append("")
    for name, v in result.categories().items():
        lines.append(f"{'[' + name + ']':<40} {100 * v['accuracy']:>7.2f} {v['questions']:>6}")
    questions = sum(r.total for r in result.subjects.values())
    lines.append(f"{'mean over subjects':<40} {100 * result.mean:>7.2f} {questions:>6}")
    return "\n".join(lines)
