"""Evaluation: Elo tournaments from pairwise judgements and scores relative to a reference system.

- ``qlorakit.eval.elo``: read ``<a>-vs-<b>-<judge>-reviewer...jsonl`` verdict files, replay the matches
  over many seeded random orderings and report mean Elo with intervals (QLoRA paper, Tables 1 and 7).
- ``qlorakit.eval.relative``: 10-point judgements against a reference system (ChatGPT) as a percentage of
  the reference's total score (QLoRA paper, Table 6).

Both need only numpy (matplotlib for the chart); importing this package loads neither torch nor a model.
"""
