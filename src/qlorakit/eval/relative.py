"""Scores relative to a reference system: the QLoRA paper's "% of ChatGPT" (Dettmers et al., 2023, Table 6).

Input: JSONL files named ``<a>-vs-<b>-<judge>-reviewer.jsonl`` (artidoro/qlora
``eval/ratings-gpt4/vicuna/relative-gpt-3.5``), one side being the reference system (``gpt-3.5``, i.e.
ChatGPT, in the release). Rows: ``score = [score of answer 1, score of answer 2]`` on GPT-4's 10-point scale
(halves and 0 occur; ``[-1, -1]`` = the judge's answer could not be parsed: skipped and counted) and the ids
``answer1_id``/``answer2_id`` of the two answers.

Which answer is the reference's is decided by answer id, never by the file name: in the release, answer 1
is the *second*-named system in the 66 files with a fine-tuned model and the *first*-named one in the 6
files with GPT-4, Bard and Vicuna-13B; reading sides from names gives e.g. FLAN-v2-30B at 263%. The
reference ids come from ``reference_answers`` (the reference system's answer file, field ``answer_id``)
or, without it, are inferred: the reference's answer to a question is judged in every file, so for each
question the one answer id that occurs in all files judging it is the reference's (this needs the
question judged for two or more systems; otherwise pass the answer file).

Score of a system S, over all parsed judgements of both presentation orders (n = 160 on the release):

    percent(S) = 100 * sum_i score_i(S) / sum_i score_i(reference)

the ratio of totals pooled over both orders. This is what the paper's Table 6 reports, determined from the
files: the mean of the two per-order ratios gives GPT-4 114.76, Alpaca-65B 70.44, FLAN-v2-65B 48.29
where the paper has 114.5, 70.7, 48.4, and the pooled ratio gives 114.49, 70.66, 48.44; for Guanaco
65B/33B/13B/7B both round alike (pooled 99.26, 97.82, 90.39, 86.97 vs the paper's 99.3, 97.8, 90.4, 87.0).
The per-order ratios (reference shown first / system shown first, by answer position) are reported too.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlorakit.errors import DataError
from qlorakit.eval.elo import (
    JudgementFile,
    check_models,
    collect_files,
    parse_judgement_name,
    read_jsonl,
)

REFERENCE = "gpt-3.5"
MAX_SCORE = 10.0
UNPARSED = -1


@dataclass(frozen=True)
class Judgement:
    """One parsed 10-point judgement, seen from the system's side."""

    question: Any
    system_score: float
    reference_score: float
    reference_first: bool  # the reference's answer was Assistant 1


@dataclass(frozen=True)
class RelativeScore:
    """A system's total score as a percentage of the reference's, pooled and per presentation order."""

    model: str
    percent: float
    reference_shown_first: float | None
    system_shown_first: float | None
    judgements: int
    skipped: int
    system_total: float
    reference_total: float


@dataclass(frozen=True)
class RelativeResult:
    """Scores ranked by ``percent`` (highest first)."""

    reference: str
    scores: tuple[RelativeScore, ...]
    skipped: int
    files: int
    files_answer1_not_first_named: int

    def as_dict(self) -> dict[str, Any]:
        models = {s.model: {k: v for k, v in asdict(s).items() if k != "model"} for s in self.scores}
        return {"reference": self.reference, "models": models, "skipped": self.skipped, "files": self.files,
                "files_answer1_not_first_named": self.files_answer1_not_first_named}


def _pair(row: dict[str, Any], where: str) -> tuple[float, float] | None:
    """The ``score`` pair of a row, None when unparsed (-1); DataError when malformed."""
    value = row.get("score")
    if value is None:
        raise DataError(f"{where}: field 'score': missing")
    numeric = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not numeric:
        raise DataError(f"{where}: field 'score': expected a pair [score of answer 1, score of answer 2], "
                        f"got {value!r}")
    if UNPARSED in value:
        return None
    if not all(0 <= v <= MAX_SCORE for v in value):
        raise DataError(f"{where}: field 'score': scores must lie in [0, {MAX_SCORE:g}] (or be -1), got {value!r}")
    return float(value[0]), float(value[1])


def _answer_ids(row: dict[str, Any], where: str) -> tuple[str, str]:
    """``(answer1_id, answer2_id)`` of a row; DataError when either is missing or not a string."""
    for field in ("answer1_id", "answer2_id"):
        if not isinstance(row.get(field), str) or not row[field]:
            raise DataError(f"{where}: field '{field}': expected a non-empty answer id string, got {row.get(field)!r}")
    return row["answer1_id"], row["answer2_id"]


def read_reference_ids(paths: Sequence[str | os.PathLike[str]]) -> frozenset[str]:
    """The ``answer_id`` of every row of the reference system's answer file(s)."""
    ids = set()
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: reference answer file not found")
        for number, row in read_jsonl(path):
            if not isinstance(row.get("answer_id"), str):
                raise DataError(f"{path}:{number}: field 'answer_id': expected a string, got {row.get('answer_id')!r}")
            ids.add(row["answer_id"])
    if not ids:
        raise DataError(f"no answer ids in {', '.join(map(str, paths))}")
    return frozenset(ids)


def infer_reference_ids(rows: Mapping[Path, list[tuple[int, dict[str, Any]]]]) -> frozenset[str]:
    """Per question, the one answer id in every file that judges the question: the reference's answer."""
    files_of: dict[Any, set[Path]] = defaultdict(set)
    seen: dict[Any, dict[str, set[Path]]] = defaultdict(lambda: defaultdict(set))
    for path, file_rows in rows.items():
        for number, row in file_rows:
            question = _question_id(row, f"{path}:{number}")
            files_of[question].add(path)
            for answer in _answer_ids(row, f"{path}:{number}"):
                seen[question][answer].add(path)
    ids = set()
    for question, answers in seen.items():
        everywhere = [a for a, files in answers.items() if files == files_of[question]]
        if len(everywhere) != 1:
            judging = sorted(map(str, files_of[question]))
            raise DataError(f"cannot tell the reference's answer to question {question!r} from the files alone "
                            f"({len(everywhere)} answer ids occur in all {len(judging)} files judging it: "
                            f"{', '.join(judging[:5])}); pass the reference system's answer file (--reference-answers)")
        ids.add(everywhere[0])
    return frozenset(ids)


def _question_id(row: dict[str, Any], where: str) -> Any:
    """A row's ``question_id`` (a string or number, or absent); DataError for a list or an object."""
    question = row.get("question_id")
    if isinstance(question, (list, dict)):
        raise DataError(f"{where}: field 'question_id': expected a string or number, got {type(question).__name__}")
    return question


def _sides(jf: JudgementFile, reference: str) -> tuple[str, bool]:
    """The system a file judges against the reference, and whether the reference is named first."""
    if (jf.first == reference) == (jf.second == reference):
        raise DataError(f"{jf.path}: exactly one side of the file name must be the reference system '{reference}' "
                        f"(got '{jf.first}' and '{jf.second}'); pass --reference NAME if it is named differently")
    return (jf.second, True) if jf.first == reference else (jf.first, False)


def _judgements(jf: JudgementFile, rows: list[tuple[int, dict[str, Any]]], reference_ids: frozenset[str],
                reference_named_first: bool) -> tuple[list[Judgement], int, bool]:
    """A file's parsed judgements, its unparsed count, and whether answer 1 is ever not the first-named system."""
    out: list[Judgement] = []
    skipped, flipped = 0, False
    for number, row in rows:
        where = f"{jf.path}:{number}"
        id1, id2 = _answer_ids(row, where)
        reference_first = id1 in reference_ids
        if reference_first == (id2 in reference_ids):
            which = "both answer ids are" if reference_first else "neither answer id is"
            raise DataError(f"{where}: fields 'answer1_id'/'answer2_id': {which} the reference system's; "
                            "exactly one must be (check --reference-answers)")
        flipped = flipped or reference_first != reference_named_first
        pair = _pair(row, where)
        if pair is None:
            skipped += 1
            continue
        system, ref = (pair[1], pair[0]) if reference_first else pair
        out.append(Judgement(row.get("question_id"), system, ref, reference_first))
    return out, skipped, flipped


def _percent(judgements: Sequence[Judgement], where: str) -> float | None:
    """``100 * sum(system) / sum(reference)`` or None without judgements; ``where`` names the files."""
    if not judgements:
        return None
    reference_total = sum(j.reference_score for j in judgements)
    if reference_total == 0:
        raise DataError(f"{where}: the reference's scores sum to 0; a percentage of it is undefined")
    return 100.0 * sum(j.system_score for j in judgements) / reference_total


def _score(model: str, judgements: list[Judgement], skipped: int, paths: list[Path]) -> RelativeScore:
    where = f"'{model}' ({', '.join(map(str, paths[:5]))})"
    percent = _percent(judgements, where)
    if percent is None:
        raise DataError(f"no parsed judgements for {where} (all {skipped} rows have score -1)")
    return RelativeScore(
        model, percent,
        reference_shown_first=_percent([j for j in judgements if j.reference_first], where),
        system_shown_first=_percent([j for j in judgements if not j.reference_first], where),
        judgements=len(judgements), skipped=skipped,
        system_total=sum(j.system_score for j in judgements),
        reference_total=sum(j.reference_score for j in judgements))


def relative_scores(sources: Sequence[str | os.PathLike[str]], reference: str = REFERENCE,
                    reference_answers: Sequence[str | os.PathLike[str]] | None = None,
                    models: Sequence[str] | None = None) -> RelativeResult:
    """Read and validate every file under ``sources``, then score each system against ``reference``."""
    files = [parse_judgement_name(p) for p in collect_files(sources)]
    check_models(files, None if models is None else [*models, reference])
    sides = {jf.path: _sides(jf, reference) for jf in files}
    rows = {jf.path: list(read_jsonl(jf.path)) for jf in files}
    reference_ids = read_reference_ids(reference_answers) if reference_answers else infer_reference_ids(rows)
    per_model: dict[str, list[Judgement]] = defaultdict(list)
    paths: dict[str, list[Path]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    flipped_files = 0
    for jf in files:
        system, reference_named_first = sides[jf.path]
        judgements, unparsed, flipped = _judgements(jf, rows[jf.path], reference_ids, reference_named_first)
        per_model[system].extend(judgements)
        paths[system].append(jf.path)
        skipped[system] += unparsed
        flipped_files += flipped
    scores = sorted((_score(m, js, skipped[m], paths[m]) for m, js in per_model.items()), key=lambda s: -s.percent)
    return RelativeResult(reference, tuple(scores), sum(skipped.values()), len(files), flipped_files)


def format_relative_table(result: RelativeResult, paper: Mapping[str, float] | None = None,
                          labels: Mapping[str, str] | None = None) -> str:
    """A ranked text table; ``paper`` adds a column of published percentages, ``labels`` display names."""
    labels = labels or {}
    width = max([len(labels.get(s.model, s.model)) for s in result.scores] + [6])
    head = f"{'model':<{width}}  {'% of ref':>8}  {'ref 1st':>7}  {'sys 1st':>7}  {'n':>4}  {'skip':>4}"
    lines = [head + ("  paper   diff" if paper else "")]
    for s in result.scores:
        per_order = [f"{v:7.1f}" if v is not None else f"{'-':>7}" for v in (s.reference_shown_first,
                                                                            s.system_shown_first)]
        line = (f"{labels.get(s.model, s.model):<{width}}  {s.percent:8.2f}  {per_order[0]}  {per_order[1]}"
                f"  {s.judgements:4d}  {s.skipped:4d}")
        if paper and s.model in paper:
            line += f"  {paper[s.model]:5.1f}  {s.percent - paper[s.model]:+5.2f}"
        lines.append(line)
    lines.append(f"% of {result.reference}: 100 * sum(system scores) / sum({result.reference} scores) over both "
                 f"presentation orders; {result.files} file(s), {result.skipped} unparsed judgement(s) skipped; "
                 f"{result.files_answer1_not_first_named} file(s) show the second-named system as answer 1")
    return "\n".join(lines)
