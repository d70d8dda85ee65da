"""Reproduce the QLoRA paper's chatbot tables from its released GPT-4 judgements (a script, not a test).

    python benchmarks/elo_reproduction.py [--data-dir ../shared/data/elo] [--orderings 10000] [--seed 0]

1. Elo (paper Table 1, GPT-4 judge on the Vicuna benchmark): ``qlorakit.eval.elo`` on all 56 files of
   ``vicuna-gpt4-pairwise/`` (4,480 verdicts, 13 unparsed skipped), 10,000 seeded orderings, start 1000,
   once with K = 32 (the recipe as stated) and once with K = 4 (the LMSYS Chatbot Arena notebook's
   default, which reproduces the published means); each next to the paper's value.
2. "% of ChatGPT" (paper Table 6): ``qlorakit.eval.relative`` on the 72 files of
   ``vicuna-gpt4-relative-chatgpt/``, sum of the system's scores / sum of ChatGPT's over both orders.

Prints both tables and writes ``benchmarks/results/elo_reproduction.json`` plus the charts
``elo_reproduction_k4.png`` and ``elo_reproduction_k32.png`` (paper values marked). About 15 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from qlorakit.eval import elo, relative

from _harness import write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/elo"
RESULTS = REPO / "benchmarks/results"
GUANACO = "{}-guanaco-vicuna-generations-topp0.9-temp0.7"
#: QLoRA paper Table 1 (every row "± 1"): release name -> (paper's label, Elo).
PAPER_TABLE1 = {
    "answer-gpt4": ("GPT-4", 1348), GUANACO.format("65b"): ("Guanaco 65B", 1022),
    GUANACO.format("30b"): ("Guanaco 33B", 992), "answer-vicuna-13b": ("Vicuna 13B", 974),
    "answer-gpt35": ("ChatGPT", 966), GUANACO.format("13b"): ("Guanaco 13B", 916),
    "answer-bard": ("Bard", 902), GUANACO.format("7b"): ("Guanaco 7B", 879),
}
#: QLoRA paper Table 6, "% of ChatGPT" (mean column): release name -> (paper's label, percent).
PAPER_TABLE6 = {
    "gpt4": ("GPT-4", 114.5), GUANACO.format("65b"): ("Guanaco 65B", 99.3),
    GUANACO.format("30b"): ("Guanaco 33B", 97.8), "vicuna-13b": ("Vicuna 13B", 94.9), "bard": ("Bard", 94.8),
    GUANACO.format("13b"): ("Guanaco 13B", 90.4), GUANACO.format("7b"): ("Guanaco 7B", 87.0),
    "65b-alpaca-vicuna-generations-topp0.9-temp0.7": ("Alpaca 65B", 70.7),
    "65b-flan-vicuna-generations-topp0.9-temp0.7": ("FLAN v2 65B", 48.4),
}
K_VALUES = (4.0, 32.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared data/elo folder")
    parser.add_argument("--orderings", type=int, default=elo.DEFAULT_ORDERINGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "elo_reproduction.json")
    return parser.parse_args(argv)


def elo_table(results: dict[float, elo.EloResult]) -> str:
    """Paper's Table 1 next to ours for each K, in the paper's order."""
    by_k = {k: {r.model: r for r in res.ratings} for k, res in results.items()}
    head = f"{'model':<12} {'paper':>6}" + "".join(f"  {f'K={k:g}':>7} {'diff':>6} {'±CI':>5}" for k in results)
    lines = ["Elo, GPT-4 judge, Vicuna benchmark (QLoRA Table 1)", head]
    for model, (label, paper) in PAPER_TABLE1.items():
        cells = "".join(f"  {by_k[k][model].elo:7.1f} {by_k[k][model].elo - paper:+6.1f}"
                        f" {(by_k[k][model].ci_high - by_k[k][model].ci_low) / 2:5.2f}" for k in results)
        lines.append(f"{label:<12} {paper:>4} ±1{cells}")
    spreads = {k: max(r.p97_5 - r.p2_5 for r in res.ratings) / 2 for k, res in results.items()}
    lines.append("±CI = 95% CI of the mean over orderings; widest 2.5-97.5% half-spread of one ordering: "
                 + ", ".join(f"K={k:g} ±{s:.0f}" for k, s in spreads.items()))
    return "\n".join(lines)


def relative_table(result: relative.RelativeResult) -> str:
    """Paper's Table 6 next to ours (pooled ratio and both presentation orders)."""
    scores = {s.model: s for s in result.scores}
    lines = ["% of ChatGPT, GPT-4 judge, Vicuna benchmark (QLoRA Table 6)",
             f"{'model':<12} {'paper':>6} {'ours':>7} {'diff':>6}  {'ChatGPT 1st':>11} {'system 1st':>10} {'n':>4}"]
    for model, (label, paper) in PAPER_TABLE6.items():
        s = scores[model]
        lines.append(f"{label:<12} {paper:6.1f} {s.percent:7.2f} {s.percent - paper:+6.2f}  "
                     f"{s.reference_shown_first:11.1f} {s.system_shown_first:10.1f} {s.judgements:4d}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    matches = elo.read_pairwise([args.data_dir / "vicuna-gpt4-pairwise"])
    results, seconds = {}, {}
    for k in K_VALUES:
        start = time.perf_counter()
        results[k] = elo.elo_tournament(matches, orderings=args.orderings, seed=args.seed, k=k)
        seconds[k] = time.perf_counter() - start
    rel = relative.relative_scores([args.data_dir / "vicuna-gpt4-relative-chatgpt"])
    print(elo_table(results), end="\n\n")
    print(relative_table(rel))
    labels = {m: label for m, (label, _) in PAPER_TABLE1.items()}
    paper = {m: value for m, (_, value) in PAPER_TABLE1.items()}
    for k, res in results.items():
        elo.plot_ratings(res, args.output.with_name(f"{args.output.stem}_k{k:g}.png"), labels, paper)
    return {
        "command": "python benchmarks/elo_reproduction.py"
                   + (f" --orderings {args.orderings}" if args.orderings != elo.DEFAULT_ORDERINGS else "")
                   + (f" --seed {args.seed}" if args.seed else ""),
        "elo": {f"k{k:g}": {**res.as_dict(), "seconds": round(seconds[k], 2)} for k, res in results.items()},
        "elo_paper_table1": {m: {"label": label, "elo": value, "plus_minus": 1} for m, (label, value)
                             in PAPER_TABLE1.items()},
        "relative": rel.as_dict(),
        "relative_paper_table6": {m: {"label": label, "percent": value} for m, (label, value)
                                  in PAPER_TABLE6.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_result(args.output, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
