"""Elo ratings from pairwise judgements: the QLoRA paper's tournament (Dettmers et al., 2023, sec. 5, Tables 1, 7).

Input: JSONL files named ``<a>-vs-<b>-<judge>-reviewer[-threeclass].jsonl`` as in the paper's release
(artidoro/qlora ``eval/ratings-gpt4``): system ``a`` was shown to the judge as Assistant 1 and ``b`` as
Assistant 2 (checked on the release: the answer ids of all 4,480 rows agree). Each row's ``score`` is the
verdict: 1 = a better, 2 = b better, 3 = tie, -1 = the judge's answer could not be parsed (skipped and
counted). Every file is read and validated before anything is computed.

One ordering of all matches: every model starts at ``R = 1000``; a match of ``a`` against ``b`` with
result ``S_a`` (1 win, 0.5 tie, 0 loss) updates

    E_a = 1 / (1 + 10^((R_b - R_a) / 400))
    R_a <- R_a + K (S_a - E_a),        R_b <- R_b - K (S_a - E_a)

Final ratings depend on the order, so the tournament is replayed over N seeded random permutations of
all matches (default N = 10,000). Per model, over the N final ratings ``r_1..r_N``:

- ``elo``: the mean;
- ``ci_low``/``ci_high``: the 95% interval of that mean, ``mean ± 1.96 s / sqrt(N)`` with ``s`` the sample
  standard deviation; a Monte-Carlo error, which is what the paper's "±" reports (±1 in its Table 1);
- ``p2_5``/``p97_5``: the 2.5th/97.5th percentiles, how far one ordering alone moves a rating.

K is a parameter. The default 32 is the recipe as stated; the paper's Table 1 means are reproduced by
K = 4 (the default of LMSYS's Chatbot Arena notebook of May 2023), see docs/elo.md.

``replay`` is vectorized over orderings: step t plays the t-th match of every ordering at once, a
gather/scatter on a flat ``(orderings * models)`` rating array; ``replay_reference`` is the plain loop
it is tested against.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlorakit.errors import ConfigError, DataError
from qlorakit.fileio import save_figure_atomic, write_json_atomic  # noqa: F401  (callers use elo.write_json_atomic)
from qlorakit.untrusted import decode_utf8, parse_json

INITIAL_RATING = 1000.0
K_FACTOR = 32.0
DEFAULT_ORDERINGS = 10_000
Z_95 = 1.959963984540054  # standard normal 97.5% quantile
KNOWN_JUDGES = ("gpt-4", "gpt4")  # the judge part of a file name: <a>-vs-<b>-<judge>-reviewer...
VERDICTS = {1: 1.0, 2: 0.0, 3: 0.5}  # verdict -> result of the first-named system
UNPARSED = -1
_CHUNK = 1000  # orderings replayed together; memory ~32 bytes x matches x chunk
_LN10_OVER_400 = math.log(10.0) / 400.0


@dataclass(frozen=True)
class JudgementFile:
    """A judgement file and the parts of its name: first- and second-named system, judge."""

    path: Path
    first: str
    second: str
    judge: str


def parse_judgement_name(path: str | os.PathLike[str]) -> JudgementFile:
    """Split ``<a>-vs-<b>-<judge>-reviewer[-threeclass].jsonl`` into its parts, or raise DataError."""
    path = Path(path)
    name = path.name
    expected = "<a>-vs-<b>-<judge>-reviewer[-threeclass].jsonl"
    stem = next((name[: -len(s)] for s in ("-reviewer-threeclass.jsonl", "-reviewer.jsonl") if name.endswith(s)), None)
    judge = next((j for j in KNOWN_JUDGES if stem is not None and stem.endswith("-" + j)), None)
    if stem is None or judge is None:
        raise DataError(f"{path}: file name does not follow {expected} with judge one of {', '.join(KNOWN_JUDGES)}")
    systems = stem[: -len(judge) - 1].split("-vs-")
    if len(systems) != 2 or not all(systems):
        raise DataError(f"{path}: file name must name two systems separated by one '-vs-' ({expected})")
    if systems[0] == systems[1]:
        raise DataError(f"{path}: both sides name the same system '{systems[0]}'")
    return JudgementFile(path, systems[0], systems[1], judge)


def collect_files(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The ``*.jsonl`` files of each directory (sorted) and each file given, without duplicates."""
    if not sources:
        raise DataError("no judgement files given; pass --data with a directory or .jsonl files")
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(source.glob("*.jsonl"))
            if not found:
                raise DataError(f"{source}: directory holds no .jsonl judgement files")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise DataError(f"{source}: no such file or directory")
    unique = {f.resolve(): f for f in files}
    return list(unique.values())


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, row)`` for each non-blank line; a bad line raises DataError naming it."""
    text = decode_utf8(path.read_bytes(), str(path), DataError)
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        row = parse_json(line, str(path), DataError, line_offset=number - 1)
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def check_models(files: Sequence[JudgementFile], models: Sequence[str] | None) -> None:
    """Raise DataError for a file that names a system outside ``models`` (when ``models`` is given)."""
    if models is None:
        return
    allowed = set(models)
    for jf in files:
        unknown = [m for m in (jf.first, jf.second) if m not in allowed]
        if unknown:
            raise DataError(f"{jf.path}: unknown model '{unknown[0]}' (known: {', '.join(models)}); "
                            "fix the file name or add the model to --models")


@dataclass(frozen=True)
class Matches:
    """All counted matches: ``first[i]`` (Assistant 1) vs ``second[i]`` with result ``score[i]`` for first."""

    models: tuple[str, ...]
    first: np.ndarray  # (matches,) int64 index into models
    second: np.ndarray  # (matches,) int64
    score: np.ndarray  # (matches,) float64 in {0, 0.5, 1}
    skipped: int = 0
    files: int = 0

    @classmethod
    def from_records(cls, records: Sequence[tuple[str, str, float]], skipped: int = 0, files: int = 0) -> Matches:
        """Build from ``(first, second, result of first)`` triples; models are numbered by first appearance."""
        index: dict[str, int] = {}
        first, second = [], []
        for a, b, _ in records:
            if a == b:
                raise DataError(f"a match of '{a}' against itself; every match needs two different models")
            first.append(index.setdefault(a, len(index)))
            second.append(index.setdefault(b, len(index)))
        score = np.array([s for _, _, s in records], dtype=np.float64)
        return cls(tuple(index), np.array(first, dtype=np.int64), np.array(second, dtype=np.int64), score,
                   skipped, files)


def _verdict(row: dict[str, Any], where: str) -> float | None:
    """The first-named system's result for one row, None for an unparsed verdict (-1)."""
    if "score" not in row:
        raise DataError(f"{where}: field 'score': missing")
    value = row["score"]
    if isinstance(value, int) and not isinstance(value, bool):
        if value == UNPARSED:
            return None
        if value in VERDICTS:
            return VERDICTS[value]
    hint = " (a [score1, score2] pair is a 10-point relative file: use `eval relative`)"
    hint = hint if isinstance(value, list) else ""
    raise DataError(f"{where}: field 'score': expected 1, 2, 3 or -1, got {value!r}{hint}")


def read_pairwise(sources: Sequence[str | os.PathLike[str]], models: Sequence[str] | None = None) -> Matches:
    """Read and validate every pairwise file under ``sources``; -1 verdicts are skipped and counted."""
    files = [parse_judgement_name(p) for p in collect_files(sources)]
    check_models(files, models)
    records: list[tuple[str, str, float]] = []
    skipped = 0
    for jf in files:
        for number, row in read_jsonl(jf.path):
            result = _verdict(row, f"{jf.path}:{number}")
            if result is None:
                skipped += 1
            else:
                records.append((jf.first, jf.second, result))
    if not records:
        names = ", ".join(str(jf.path) for jf in files[:5]) + (", ..." if len(files) > 5 else "")
        raise DataError(f"no countable matches in {len(files)} file(s) ({names}): every verdict was -1 or the files "
                        "are empty")
    return Matches.from_records(records, skipped, len(files))


def expected_score(r_a: np.ndarray | float, r_b: np.ndarray | float) -> np.ndarray | float:
    """Elo expected score of a against b: ``1 / (1 + 10^((r_b - r_a) / 400))``."""
    return 1.0 / (1.0 + 10.0 ** ((r_b - r_a) / 400.0))


def replay_reference(matches: Matches, order: Sequence[int], k: float = K_FACTOR,
                     initial: float = INITIAL_RATING) -> np.ndarray:
    """Final ratings after playing ``matches`` in ``order``: the plain loop ``replay`` must equal."""
    ratings = [float(initial)] * len(matches.models)
    for i in order:
        a, b, s = int(matches.first[i]), int(matches.second[i]), float(matches.score[i])
        delta = k * (s - expected_score(ratings[a], ratings[b]))
        ratings[a] += delta
        ratings[b] -= delta
    return np.array(ratings)


def replay(matches: Matches, orders: np.ndarray, k: float = K_FACTOR, initial: float = INITIAL_RATING) -> np.ndarray:
    """Final ratings for each ordering: ``orders`` (orderings, matches) -> (orderings, models).

    ``E_a`` is computed as ``1 / (1 + exp((R_b - R_a) ln10 / 400))``, equal to the base-10 form to ~1e-15
    relative; all buffers are reused so one step is a handful of numpy calls over the orderings.
    """
    n_orderings, n_models = orders.shape[0], len(matches.models)
    ratings = np.full(n_orderings * n_models, float(initial))  # flat: (ordering o, model m) at o * n_models + m
    row_base = (np.arange(n_orderings, dtype=np.int64) * n_models)[None, :]
    idx_a = matches.first[orders].T + row_base  # (matches, orderings): step t is one contiguous row
    idx_b = matches.second[orders].T + row_base
    results = np.ascontiguousarray(matches.score[orders].T)  # (matches, orderings)
    r_a, r_b, delta = np.empty(n_orderings), np.empty(n_orderings), np.empty(n_orderings)
    for t in range(orders.shape[1]):
        np.take(ratings, idx_a[t], out=r_a)
        np.take(ratings, idx_b[t], out=r_b)
        np.subtract(r_b, r_a, out=delta)
        delta *= _LN10_OVER_400
        np.exp(delta, out=delta)
        delta += 1.0
        np.reciprocal(delta, out=delta)  # E_a
        np.subtract(results[t], delta, out=delta)
        delta *= k
        r_a += delta
        r_b -= delta
        ratings[idx_a[t]] = r_a
        ratings[idx_b[t]] = r_b
    return ratings.reshape(n_orderings, n_models)


def random_orders(n_matches: int, orderings: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded random permutations of ``range(n_matches)``, yielded in chunks of (<= _CHUNK, n_matches)."""
    rng = np.random.default_rng(seed)
    for start in range(0, orderings, _CHUNK):
        count = min(_CHUNK, orderings - start)
        yield rng.permuted(np.tile(np.arange(n_matches, dtype=np.int64), (count, 1)), axis=1)


@dataclass(frozen=True)
class ModelRating:
    """One model's Elo summary over all orderings (see the module docstring for each statistic)."""

    model: str
    elo: float
    ci_low: float
    ci_high: float
    p2_5: float
    p97_5: float
    matches: int
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class EloResult:
    """Ratings ranked by mean Elo (highest first) and how they were computed."""

    ratings: tuple[ModelRating, ...]
    skipped: int
    orderings: int
    seed: int
    k: float
    initial_rating: float
    files: int

    def as_dict(self) -> dict[str, Any]:
        models = {r.model: {key: v for key, v in asdict(r).items() if key != "model"} for r in self.ratings}
        return {"models": models, "skipped": self.skipped, "orderings": self.orderings, "seed": self.seed,
                "k": self.k, "initial_rating": self.initial_rating, "files": self.files,
                "matches": sum(r.matches for r in self.ratings) // 2}


def _summarize(matches: Matches, finals: np.ndarray) -> list[ModelRating]:
    """Per-model statistics of ``finals`` (orderings, models) and win/tie/loss counts."""
    n = finals.shape[0]
    mean = finals.mean(axis=0)
    half = Z_95 * finals.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
    low, high = np.percentile(finals, [2.5, 97.5], axis=0)
    out = []
    for m, name in enumerate(matches.models):
        as_first, as_second = matches.score[matches.first == m], 1.0 - matches.score[matches.second == m]
        results = np.concatenate([as_first, as_second])
        ties = int(np.count_nonzero(results == 0.5))
        out.append(ModelRating(name, float(mean[m]), float(mean[m] - half[m]), float(mean[m] + half[m]),
                               float(low[m]), float(high[m]), int(results.size),
                               int(np.count_nonzero(results == 1.0)), ties, int(np.count_nonzero(results == 0.0))))
    return sorted(out, key=lambda r: -r.elo)


def elo_tournament(matches: Matches, orderings: int = DEFAULT_ORDERINGS, seed: int = 0, k: float = K_FACTOR,
                   initial: float = INITIAL_RATING) -> EloResult:
    """Replay ``matches`` over ``orderings`` seeded random orderings and summarize each model."""
    if orderings < 1:
        raise ConfigError(f"orderings = {orderings}: need at least 1 ordering")
    if seed < 0:
        raise ConfigError(f"seed = {seed}: must be >= 0")
    if not k > 0:
        raise ConfigError(f"k = {k}: the K factor must be > 0")
    chunks = random_orders(len(matches.score), orderings, seed)
    finals = np.concatenate([replay(matches, orders, k, initial) for orders in chunks])  # (orderings, models)
    return EloResult(tuple(_summarize(matches, finals)), matches.skipped, orderings, seed, float(k), float(initial),
                     matches.files)


def format_table(result: EloResult, reference: Mapping[str, float] | None = None,
                 labels: Mapping[str, str] | None = None) -> str:
    """A ranked text table; ``reference`` adds a column of published values, ``labels`` display names."""
    labels = labels or {}
    width = max([len(labels.get(r.model, r.model)) for r in result.ratings] + [5])
    head = (f"{'rank':>4}  {'model':<{width}}  {'elo':>7}  {'95% CI of mean':>17}  {'2.5-97.5% spread':>16}"
            f"  {'W/T/L':>13}")
    head += "  paper  diff" if reference else ""
    lines = [head]
    for rank, r in enumerate(result.ratings, start=1):
        line = (f"{rank:>4}  {labels.get(r.model, r.model):<{width}}  {r.elo:7.1f}  [{r.ci_low:7.1f}, {r.ci_high:7.1f}]"
                f"  [{r.p2_5:6.0f}, {r.p97_5:6.0f}]  {r.wins:4d}/{r.ties:3d}/{r.losses:4d}")
        if reference and r.model in reference:
            line += f"  {reference[r.model]:5.0f}  {r.elo - reference[r.model]:+5.1f}"
        lines.append(line)
    lines.append(f"{result.orderings} orderings, seed {result.seed}, K = {result.k:g}, "
                 f"start {result.initial_rating:g}; {sum(r.matches for r in result.ratings) // 2} matches from "
                 f"{result.files} file(s), {result.skipped} unparsed verdict(s) skipped")
    return "\n".join(lines)


def plot_ratings(result: EloResult, path: str | os.PathLike[str], labels: Mapping[str, str] | None = None,
                 reference: Mapping[str, float] | None = None) -> Path:
    """Draw mean Elo with the 95% CI and the 2.5-97.5% spread per model into a PNG (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = labels or {}
    rows = list(reversed(result.ratings))  # best model on top
    y = np.arange(len(rows))
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(rows)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    spread = np.array([[r.elo - r.p2_5 for r in rows], [r.p97_5 - r.elo for r in rows]])
    ci = np.array([[r.elo - r.ci_low for r in rows], [r.ci_high - r.elo for r in rows]])
    elo = [r.elo for r in rows]
    ax.errorbar(elo, y, xerr=spread, fmt="none", ecolor="0.7", elinewidth=6, label="2.5-97.5% over orderings")
    ax.errorbar(elo, y, xerr=ci, fmt="o", color="C0", capsize=4, label="mean, 95% CI of the mean")
    if reference:
        ref = [(reference[r.model], i) for i, r in enumerate(rows) if r.model in reference]
        ax.plot(*zip(*ref, strict=True), "x", color="C3", markersize=8, label="paper")
    ax.set_yticks(y, [labels.get(r.model, r.model) for r in rows])
    ax.set_xlabel(f"Elo (K = {result.k:g}, {result.orderings} orderings, seed {result.seed})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


