"""``qlorakit data vicuna-pairs OUT.jsonl``: build preference pairs from the Vicuna GPT-4 judgements.

Writes ``OUT.jsonl`` (the ``preference`` format, with the question id and the systems for the record) and
``OUT.counts.json`` (judgements read, ties and unparsed verdicts dropped, pairs whose two presentation orders
disagree, pairs written), and prints the counts (``data.vicuna_pairs`` says how pairs are formed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlorakit.cli.arg_types import non_negative_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build training data files (vicuna-pairs: DPO / ORPO preference pairs)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    v = sub.add_parser("vicuna-pairs", help="preference pairs from the GPT-4 judgements of the Vicuna benchmark")
    v.add_argument("out", metavar="OUT.jsonl", help="the preference file to write (its counts go to OUT.counts.json)")
    v.add_argument("--elo-dir", default="../shared/data/elo",
                   help="the folder with vicuna_questions.jsonl, vicuna-gpt4-pairwise/ and vicuna-generations/ "
                        "(default: %(default)s)")
    v.add_argument("--per-question", type=non_negative_int, default=0,
                   help="keep at most N pairs per question, a seeded choice (default: 0 = all)")
    v.add_argument("--seed", type=int, default=0, help="seed of the --per-question choice (default: 0)")
    v.set_defaults(func=run_vicuna_pairs)


def counts_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".counts.json")


def run_vicuna_pairs(args: argparse.Namespace) -> int:
    from qlorakit.data.vicuna_pairs import build_vicuna_pairs
    from qlorakit.fileio import write_json_atomic, write_text_atomic

    rows, counts = build_vicuna_pairs(args.elo_dir, args.per_question, args.seed)
    out = Path(args.out)
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_json_atomic(counts_path(out), counts)
    v = counts["verdicts"]
    print(f"read {counts['judgements']:,} judgements in {counts['judgement_files']} files: "
          f"{v.get('first better', 0):,} first better, {v.get('second better', 0):,} second better, "
          f"{v.get('tie', 0):,} ties and {v.get('unparsed', 0):,} unparsed (dropped)")
    print(f"{counts['system_pairs']:,} (question, system pair)s judged in both orders: "
          + ", ".join(f"{n:,} dropped, {why}" for why, n in counts["dropped_pairs"].items()))
    print(f"wrote {counts['written']:,} of {counts['pairs']:,} pairs ({counts['questions']} questions) to {out}; "
          f"counts in {counts_path(out)}")
    return 0
