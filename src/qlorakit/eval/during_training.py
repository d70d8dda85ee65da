"""Perplexity and MMLU during training: inputs prepared and checked once before training, scored at each evaluation.

``build_training_evaluator(eval_config, tokenizer, batch_size)`` reads and tokenizes ``eval_ppl_file`` and reads every
MMLU CSV under ``eval_mmlu_dir`` (first ``eval_mmlu_limit`` questions per subject), so a missing or
malformed file fails before the model is loaded. The returned ``TrainingEvaluator`` is called by the
trainer with the model at each evaluation step and returns the metrics row's values:

    {"eval_ppl": PPL, "eval_ppl_tokens": T}    sliding-window perplexity (``eval.perplexity``)
    {"mmlu_mean": m, "mmlu_questions": n}       mean over subjects of the accuracy (``eval.mmlu``)

The model is put in eval mode (no dropout) and restored to its previous mode afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlorakit.errors import DataError
from qlorakit.eval import mmlu, perplexity


@dataclass
class TrainingEvaluator:
    """Prepared evaluation inputs; ``evaluator(model)`` -> the metrics to log."""

    ppl_ids: list[int] | None = None
    ppl_max_seq_len: int = 1024
    ppl_stride: int = 512
    mmlu_plans: dict[str, tuple[list[mmlu.PromptPlan], list[int]]] = field(default_factory=dict)  # plans, answers
    letter_ids: list[int] = field(default_factory=list)
    batch_size: int = 1

    def __call__(self, model: Any) -> dict[str, float | int]:
        was_training = model.training
        model.eval()
        try:
            return self._scores(model)
        finally:
            model.train(was_training)

    def _scores(self, model: Any) -> dict[str, float | int]:
        row: dict[str, float | int] = {}
        if self.ppl_ids is not None:
            result = perplexity.perplexity(model, self.ppl_ids, self.ppl_max_seq_len, self.ppl_stride,
                                           self.batch_size, progress=False)
            row.update(eval_ppl=result.perplexity, eval_ppl_tokens=result.tokens)
        if self.mmlu_plans:
            accuracies, questions = [], 0
            for plans, answers in self.mmlu_plans.values():
                predicted = mmlu.score_subject(model, plans, self.letter_ids, self.batch_size).argmax(dim=1).tolist()
                accuracies.append(sum(p == a for p, a in zip(predicted, answers, strict=True)) / len(answers))
                questions += len(answers)
            row.update(mmlu_mean=sum(accuracies) / len(accuracies), mmlu_questions=questions)
        return row


def build_training_evaluator(config: Any, tokenizer: Any, batch_size: int = 1) -> TrainingEvaluator | None:
    """The evaluator for an ``EvalConfig``'s ``eval_ppl_*`` / ``eval_mmlu_*`` fields, or None when both are off.

    ``batch_size``: sequences per forward (the trainer passes its micro-batch size).
    """
    if not config.eval_ppl_file and not config.eval_mmlu_dir:
        return None
    evaluator = TrainingEvaluator(ppl_max_seq_len=config.eval_ppl_max_seq_len, ppl_stride=config.eval_ppl_stride,
                                  batch_size=batch_size)
    if config.eval_ppl_file:
        perplexity.check_window(config.eval_ppl_max_seq_len, config.eval_ppl_stride)
        ids = tokenizer(perplexity.read_text(config.eval_ppl_file))["input_ids"]
        if len(ids) < 2:
            raise DataError(f"eval_ppl_file {config.eval_ppl_file}: {len(ids)} token(s); perplexity needs at least 2")
        evaluator.ppl_ids = ids
    if config.eval_mmlu_dir:
        data = mmlu.load_subjects(config.eval_mmlu_dir, config.eval_mmlu_shots, config.eval_mmlu_limit or None)
        evaluator.letter_ids = mmlu.letter_token_ids(tokenizer)
        for subject, (dev, tests) in data.items():
            plans = mmlu.plan_prompts(tokenizer, subject, dev, tests, config.eval_mmlu_shots, mmlu.DEFAULT_MAX_SEQ_LEN)
            evaluator.mmlu_plans[subject] = (plans, [q.answer for q in tests])
    return evaluator
