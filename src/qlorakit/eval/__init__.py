"""Evaluation: Elo tournaments from pairwise judgements and scores relative to a reference system.

- ``qlorakit.eval.elo``: read ``<a>-vs-<b>-<judge>-reviewer...jsonl`` verdict files, replay the matches
  over many seeded random orderings and report mean Elo with intervals (QLoRA paper, Tables 1 and 7).
- ``qlorakit.eval.relative``: 10-point judgements against a reference system (ChatGPT) as a percentage of
  the reference's total score (QLoRA paper, Table 6).
- ``qlorakit.eval.perplexity``: sliding-window perplexity of a text file (docs/eval.md).
- ``qlorakit.eval.mmlu`` (+ ``mmlu_data``, ``mmlu_categories``): zero-/k-shot MMLU accuracy by letter
  logits, with the few-shot prefix's keys/values computed once per subject (``lm_scoring``).
- ``qlorakit.eval.during_training``: perplexity / MMLU inputs prepared before training, scored at each
  evaluation step; ``model_io``: model + tokenizer (+ adapter) loading for the CLI.

Elo and relative scores need only numpy (matplotlib for the chart); the model evaluations need torch.
Importing this package itself loads neither torch nor a model.
"""
