"""``qlorakit eval <evaluation>``: evaluations under one command, each its own argparse subparser.

    qlorakit eval elo --data DIR_OR_FILES... --output FILE.json [--orderings 10000] [--seed 0]
                      [--k-factor 32] [--plot FILE.png] [--models NAME...]
    qlorakit eval relative --data DIR_OR_FILES... --output FILE.json [--reference gpt-3.5]
                      [--reference-answers FILE...] [--models NAME...]
    qlorakit eval ppl|mmlu ...   (``cli.eval_lm``: evaluations that run a model)

To add an evaluation (``ppl``, ``mmlu``, ...), write one ``add_<name>(evaluations)`` function that calls
``evaluations.add_parser(...)`` and sets ``func`` to its handler ``(argparse.Namespace) -> int``, and list
it in ``EVALUATIONS``. Handlers import the library lazily so ``--help`` stays fast; every input is
validated (``DataError``/``ConfigError``, printed by ``qlorakit.cli.main``) before anything is computed,
and JSON results are written atomically (``<file>.tmp`` then ``os.replace``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from qlorakit.cli.arg_types import non_negative_int, positive_float, positive_int


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR_OR_FILE",
                        help="judgement files (.jsonl) and/or directories of them")
    parser.add_argument("--output", required=True, metavar="FILE.json", help="where to write the JSON result")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="the model names the file names may use; any other name is an error")


def add_elo(evaluations: Any) -> None:
    """Register ``eval elo``: Elo tournament over pairwise verdicts (QLoRA paper, Tables 1 and 7)."""
    from qlorakit.eval.elo import DEFAULT_ORDERINGS, K_FACTOR

    parser: argparse.ArgumentParser = evaluations.add_parser(
        "elo", help="Elo ratings from pairwise judgements (<a>-vs-<b>-<judge>-reviewer...jsonl)",
        description="Replay all pairwise verdicts (1 = first-named system better, 2 = second, 3 = tie, -1 ="
                    " unparsed: skipped) in many seeded random orders; print and write each model's mean Elo,"
                    " the 95%% CI of that mean and the 2.5-97.5%% spread over orderings.")
    _add_common(parser)
    parser.add_argument("--orderings", type=positive_int, default=DEFAULT_ORDERINGS,
                        help="random orderings of all matches (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the orderings (default: 0)")
    parser.add_argument("--k-factor", type=positive_float, default=K_FACTOR,
                        help="Elo K factor (default: %(default)s; 4 reproduces the QLoRA paper's Table 1)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the ratings with their intervals")
    parser.set_defaults(func=run_elo)


def run_elo(args: argparse.Namespace) -> int:
    """Read and check every file, run the tournament, print the table, write JSON (and the chart)."""
    from qlorakit.eval import elo

    matches = elo.read_pairwise(args.data, models=args.models)
    result = elo.elo_tournament(matches, orderings=args.orderings, seed=args.seed, k=args.k_factor)
    print(elo.format_table(result))
    print(f"wrote {elo.write_json_atomic(args.output, result.as_dict())}")
    if args.plot:
        print(f"wrote {elo.plot_ratings(result, args.plot)}")
    return 0


def add_relative(evaluations: Any) -> None:
    """Register ``eval relative``: 10-point scores as % of a reference system (QLoRA paper, Table 6)."""
    from qlorakit.eval.relative import REFERENCE

    parser: argparse.ArgumentParser = evaluations.add_parser(
        "relative", help="10-point judgements against a reference system as %% of its total score",
        description="Each system's summed scores over both presentation orders as a percentage of the"
                    " reference's summed scores in the same judgements; rows with score [-1, -1] are skipped."
                    " Which answer is the reference's is read from the answer ids, not the file name.")
    _add_common(parser)
    parser.add_argument("--reference", default=REFERENCE,
                        help="the reference system's name in the file names (default: %(default)s)")
    parser.add_argument("--reference-answers", nargs="+", metavar="FILE",
                        help="the reference's answer file(s) (JSONL with answer_id); without it the reference's"
                             " answer ids are inferred as those judged in every file")
    parser.set_defaults(func=run_relative)


def run_relative(args: argparse.Namespace) -> int:
    """Read and check every file, score each system, print the table and write JSON."""
    from qlorakit.eval.elo import write_json_atomic
    from qlorakit.eval.relative import format_relative_table, relative_scores

    result = relative_scores(args.data, reference=args.reference, reference_answers=args.reference_answers,
                             models=args.models)
    print(format_relative_table(result))
    print(f"wrote {write_json_atomic(args.output, result.as_dict())}")
    return 0


def add_ppl(evaluations: Any) -> None:
    """Register ``eval ppl`` (in ``cli.eval_lm``): sliding-window perplexity of a text file."""
    from qlorakit.cli.eval_lm import add_ppl as add

    add(evaluations)


def add_mmlu(evaluations: Any) -> None:
    """Register ``eval mmlu`` (in ``cli.eval_lm``): zero-/few-shot MMLU accuracy."""
    from qlorakit.cli.eval_lm import add_mmlu as add

    add(evaluations)


#: Evaluations under ``qlorakit eval``, in the order ``--help`` lists them.
EVALUATIONS: tuple[Callable[[Any], None], ...] = (add_elo, add_relative, add_ppl, add_mmlu)


def add_parser(subparsers: Any) -> None:
    """Register ``eval`` and every evaluation in ``EVALUATIONS`` under it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "eval", help="evaluate: Elo from pairwise judgements, %% of a reference system, perplexity, MMLU",
        description="Evaluations of chat models from judge verdicts (QLoRA paper, section 5) and of a model"
                    " itself: perplexity of a text, MMLU accuracy.")
    evaluations = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", title="evaluations", required=True)
    for add in EVALUATIONS:
        add(evaluations)
