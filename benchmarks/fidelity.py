"""Fidelity grid (issue 19): does LoRA through a 4-bit base match LoRA on the 16/32-bit base?

Every row fine-tunes the same SmolLM2-135M weights (the shared GGUF, dequantized to fp32; its only published
weights are Q4_1) with qlorakit's own trainer (``qlorakit.train.train``: the same step, data, optimizer and
evaluation code as ``qlorakit train``), on the same OASST1 train split, in the same order, for the same steps,
with the same LoRA r / alpha / dropout, lr and seeds. Only the named thing changes:

    fp32       base kept as nn.Linear in fp32 (quant_type none) + LoRA on all linear layers (16-bit LoRA baseline)
    nf4-dq     NF4 + double quant + LoRA all linear (QLoRA)
    nf4        NF4 without double quant
    fp4-dq     FP4 + double quant
    int4-dq    INT4 + double quant
    nf4-dq-qv  NF4 + double quant, LoRA on q_proj, v_proj only
    full-ft    fp32 base, full fine-tuning (``train.finetune: full``: every weight trains, no adapters), at
               ``Budget.full_ft_lr`` instead of ``Budget.lr``

The ``full-ft`` row changes two things, necessarily together: what trains, and the lr. LoRA's 1e-3 moves a
rank-16 update of each weight; applied by AdamW to every weight of the model it is a step of about 1e-3 per
value per step (full fine-tuning recipes use 1e-5 to 2e-5): measured on this data, seed 0, three updates at 1e-3
raise the held-out loss from 2.644 to 3.283, at 2e-5 they lower it to 2.632 (docs/fidelity.md). So the row uses
2e-5. Data, order, steps, schedule, batch, seeds and evaluation are the same. It was added after
the other rows had run; each run records its own commit (``commit``, one per seed), the grid's ``commit`` stays
the one the first 18 runs ran at.

Measures per (row, seed): the held-out answers-only loss (mean over answer tokens of the held-out conversations,
evaluated at a few steps: the curve), wiki perplexity on a fixed slice of ``wiki_demo.txt`` after training,
MMLU 5-shot accuracy on a fixed set of subjects (``MMLU_SUBJECTS``, the first ``MMLU_LIMIT`` test questions of
each; a 135M model sits at chance, 25%, so it can only show that nothing broke), and the wall time of the run.

MMLU was added after the grid of commit 5d5df4d had run. ``--add-mmlu`` fills it in for finished runs: it
retrains each (row, seed) that has no MMLU number (training is deterministic for a seed) and records the accuracy
only when the rerun's held-out loss equals the recorded one (``REPRODUCE_RTOL``), so the MMLU number belongs to
the same adapter as the loss beside it. The order is seed-major (every row's seed 0 first), so a partial pass
still gives every row a number. ``matches_16bit``: ``|mean - mean(fp32)| <= max(std(fp32), 0.01 * mean(fp32))``
(sample standard deviation over seeds).

The JSON is rewritten (atomically, fsynced) after every run; a second invocation skips the (row, seed) pairs
already there, so the grid can run in pieces. ``--report`` only re-renders docs/fidelity.md and the plot.

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python benchmarks/fidelity.py            # the whole grid (resumes)
    python benchmarks/fidelity.py --report                                      # docs from the JSON only
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks._harness import cpu_header, git_head, vector_flags  # noqa: E402
from qlorakit.config import (  # noqa: E402
    DataConfig,
    EvalConfig,
    LoraConfig,
    MemoryConfig,
    OptimConfig,
    QuantConfig,
    RunConfig,
    TrainConfig,
)
from qlorakit.fileio import save_figure_atomic, write_json_atomic, write_text_atomic  # noqa: E402

SHARED = Path("/work/shared")
MODEL = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
OASST = SHARED / "data/oasst1/oasst1_guanaco_val.jsonl"
WIKI = SHARED / "data/text/wiki_demo.txt"
RESULT = ROOT / "benchmarks/results/fidelity.json"
DOC = ROOT / "docs/fidelity.md"
PLOT = ROOT / "docs/fidelity_loss.png"

#: The rows, in the order they run; each differs from ``fp32`` in the named thing only.
ROWS: dict[str, dict[str, Any]] = {
    "fp32": {"quant": {"quant_type": "none"}, "targets": "all-linear"},
    "nf4-dq": {"quant": {"quant_type": "nf4", "double_quant": True}, "targets": "all-linear"},
    "nf4": {"quant": {"quant_type": "nf4", "double_quant": False}, "targets": "all-linear"},
    "fp4-dq": {"quant": {"quant_type": "fp4", "double_quant": True}, "targets": "all-linear"},
    "int4-dq": {"quant": {"quant_type": "int4", "double_quant": True}, "targets": "all-linear"},
    "nf4-dq-qv": {"quant": {"quant_type": "nf4", "double_quant": True}, "targets": ("q_proj", "v_proj")},
    "full-ft": {"quant": {"quant_type": "none"}, "targets": "all-linear", "finetune": "full"},
}
DEFAULT_ROWS = tuple(ROWS)
#: Rows added after the grid of commit 5d5df4d had run (their runs carry their own commits).
ADDED_ROWS = ("full-ft",)
BASELINE = "fp32"
MMLU_DIR = SHARED / "data/mmlu"
#: One subject per MMLU category (STEM, humanities, social sciences, other) plus one more STEM subject.
MMLU_SUBJECTS = ("high_school_biology", "world_religions", "high_school_macroeconomics", "marketing",
                 "elementary_mathematics")
MMLU_LIMIT = 20  # test questions per subject: 100 in all
MMLU_SHOTS = 5
REPRODUCE_RTOL = 1e-6  # a rerun for --add-mmlu must give the recorded held-out loss to this relative tolerance
SPLIT_SEED = 19
HELDOUT_FRACTION = 0.15


@dataclass(frozen=True)
class Budget:
    """What every run of the grid shares (stored in the JSON; a resume with another budget is refused)."""

    steps: int = 16
    batch_size: int = 2
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    eval_every: int = 8
    heldout_examples: int = 16
    wiki_tokens: int = 1024
    full_ft_lr: float = 2e-5  # the full-ft row's lr (module docstring: LoRA's lr diverges when every weight trains)
    gradient_checkpointing: bool = False  # a 135M model needs no recompute; off saves ~25% of a step


# ---- data ---------------------------------------------------------------------------------------------------


def conversation_key(row: dict[str, Any]) -> str:
    """The conversation a row belongs to: its first human turn (rows of one dialogue share it)."""
    text = row["input"]
    first = text.split("### Assistant:", 1)[0]
    return first.strip()


def split_by_conversation(rows: list[dict[str, Any]], fraction: float = HELDOUT_FRACTION,
                          seed: int = SPLIT_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) rows: whole conversations go to one side; deterministic in ``seed``."""
    keys = sorted({conversation_key(r) for r in rows})
    random.Random(seed).shuffle(keys)
    held = set(keys[: math.ceil(len(keys) * fraction)])
    train = [r for r in rows if conversation_key(r) not in held]
    heldout = [r for r in rows if conversation_key(r) in held]
    return train, heldout


def read_rows(path: Path = OASST) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---- configs ------------------------------------------------------------------------------------------------


def run_config(row: str, seed: int, budget: Budget, train_path: str, output_dir: str) -> RunConfig:
    """The ``RunConfig`` of one (row, seed); rows differ only in ``ROWS[row]`` (full fine-tuning: and the lr)."""
    spec = ROWS[row]
    finetune = spec.get("finetune", "lora")
    half = budget.seq_len // 2
    return RunConfig(
        model=str(MODEL),
        quant=QuantConfig(**spec["quant"]),
        lora=LoraConfig(r=budget.r, alpha=budget.alpha, dropout=budget.dropout, targets=spec["targets"]),
        data=DataConfig(paths=(train_path,), format="oasst1", source_max_len=half, target_max_len=half,
                        max_seq_len=budget.seq_len, val_size=0.0, seed=seed, group_by_length=False,
                        packing=False),  # the grid of 5d5df4d ran unpacked (packing came later)
        train=TrainConfig(output_dir=output_dir, max_steps=budget.steps, batch_size=budget.batch_size,
                          grad_accum=budget.grad_accum, seed=seed, compute_dtype="float32", save_total_limit=1,
                          finetune=finetune),
        optim=OptimConfig(lr=budget.full_ft_lr if finetune == "full" else budget.lr),
        # fuse_lora off: at 5d5df4d shared-input fusion skipped groups with dropout (each member drew its own mask);
        # the fused path's one mask per group came later and would change the dropout draws of the recorded grid
        memory=MemoryConfig(gradient_checkpointing=budget.gradient_checkpointing, fuse_lora=False),
        eval=EvalConfig(eval_steps=budget.eval_every),
    )


# ---- statistics ---------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def matches_16bit(values: list[float], baseline: list[float]) -> bool:
    """``|mean - mean(fp32)| <= max(std(fp32), 1% of mean(fp32))``."""
    mean, _ = mean_std(values)
    base_mean, base_std = mean_std(baseline)
    return abs(mean - base_mean) <= max(base_std, 0.01 * base_mean)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Recompute every row's means, spreads, differences to fp32 and ``matches_16bit`` from its per-seed lists."""
    rows = result["rows"]
    base = rows.get(BASELINE, {}).get("heldout_loss", [])
    for row in rows.values():
        for key in ("heldout_loss", "wiki_ppl"):
            m, s = mean_std(row[key])
            row[f"{key}_mean"], row[f"{key}_std"] = m, s
        measured = [a for a in row.get("mmlu", []) if a is not None]
        row["mmlu_mean"], row["mmlu_std"] = mean_std(measured)
        row["mmlu_seeds"] = len(measured)
        if base and row["heldout_loss"]:
            base_m, base_s = mean_std(base)
            row["diff_to_fp32"] = row["heldout_loss_mean"] - base_m
            row["diff_spread"] = math.sqrt(row["heldout_loss_std"] ** 2 + base_s**2)
            row["matches_16bit"] = matches_16bit(row["heldout_loss"], base)
        else:
            row["matches_16bit"] = None
    return result


# ---- resume -------------------------------------------------------------------------------------------------


def load_result(path: Path, budget: Budget) -> dict[str, Any]:
    """The partial grid at ``path`` (or a fresh one); refuses a file written with another budget."""
    if not path.is_file():
        return {"commit": git_head(), "budget": asdict(budget), "rows": {}}
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("budget") != asdict(budget):
        raise SystemExit(f"{path} was written with budget {result.get('budget')}, not {asdict(budget)}; "
                         "pass the same --steps/... or another --out")
    return result


def pending(result: dict[str, Any], rows: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The (row, seed) pairs not yet in ``result``, rows outer, seeds inner."""
    done = {(name, s) for name, row in result["rows"].items() for s in row.get("seeds", [])}
    return [(r, s) for r in rows for s in seeds if (r, s) not in done]


def record(result: dict[str, Any], row: str, seed: int, run: dict[str, Any]) -> None:
    """Append one run's numbers to its row (one entry per seed in every list)."""
    entry = result["rows"].setdefault(row, {"seeds": [], "heldout_loss": [], "wiki_ppl": [], "wall_s": [],
                                            "train_s": [], "curve": [], "commit": []})
    entry.setdefault("mmlu", [None] * len(entry["seeds"]))  # rows recorded before MMLU was measured
    entry["seeds"].append(seed)
    for key in ("heldout_loss", "wiki_ppl", "wall_s", "train_s", "curve", "commit"):
        entry[key].append(run[key])
    entry["mmlu"].append(run.get("mmlu"))


def missing_mmlu(result: dict[str, Any], rows: list[str]) -> list[tuple[str, int]]:
    """The recorded (row, seed) pairs without an MMLU number, seed-major (every row's first seed first)."""
    out = []
    for name in rows:
        row = result["rows"].get(name, {})
        mmlu = row.get("mmlu", [None] * len(row.get("seeds", [])))
        out += [(i, name, s) for i, (s, a) in enumerate(zip(row.get("seeds", []), mmlu, strict=True)) if a is None]
    return [(name, s) for _, name, s in sorted(out, key=lambda t: t[0])]


def add_mmlu(result: dict[str, Any], row: str, seed: int, run: dict[str, Any]) -> bool:
    """Store a rerun's MMLU accuracy if its held-out loss reproduces the recorded one; False (nothing stored) if not."""
    entry = result["rows"][row]
    i = entry["seeds"].index(seed)
    recorded = entry["heldout_loss"][i]
    if abs(run["heldout_loss"] - recorded) > REPRODUCE_RTOL * abs(recorded):
        return False
    entry.setdefault("mmlu", [None] * len(entry["seeds"]))[i] = run["mmlu"]
    entry.setdefault("mmlu_commit", [None] * len(entry["seeds"]))[i] = run["commit"]
    return True


# ---- one run ------------------------------------------------------------------------------------------------


def wiki_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of wiki_demo.txt (a fixed slice)."""
    text = WIKI.read_text(encoding="utf-8")[: n_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        raise SystemExit(f"{WIKI}: only {len(ids)} tokens in the slice, {n_tokens} wanted")
    return ids


def run_one(row: str, seed: int, budget: Budget, data: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train one (row, seed) with qlorakit's trainer; the held-out curve, final loss, wiki ppl, times."""
    import torch

    from qlorakit.data import collate_fn
    from qlorakit.eval.perplexity import perplexity
    from qlorakit.models import load_model
    from qlorakit.train import full, train

    start, commit = time.perf_counter(), git_head()  # the code this run imports: HEAD when it starts, not when it ends
    cfg = run_config(row, seed, budget, data["train_path"], str(workdir / f"{row}-{seed}"))
    torch.manual_seed(cfg.train.seed)  # as `qlorakit train`: the adapter initialization is part of the seed
    model = load_model(cfg.model, quant=cfg.quant, lora=None if cfg.full_finetune else cfg.lora,
                       compute_dtype=torch.float32)
    if cfg.full_finetune:
        full.prepare(model)  # as `qlorakit train --finetune full`: every weight trains
    result = train(model, data["train_set"], data["heldout_set"], collate_fn(data["tokenizer"]), cfg,
                   Path(cfg.train.output_dir), progress=False)
    if result.stopped_by or result.steps != budget.steps:  # SIGINT/SIGTERM: the run is not finished; record nothing
        raise SystemExit(f"{row} seed {seed} stopped by {result.stopped_by} at step {result.steps}; not recorded "
                         "(run the script again to redo it)")
    model.eval()
    ppl = perplexity(model, data["wiki_ids"], max_seq_len=budget.seq_len, progress=False).perplexity
    mmlu = mmlu_accuracy(model, data["tokenizer"]) if data.get("mmlu", True) else None
    curve = [[s, loss] for s, loss in result.eval_losses]
    return {"heldout_loss": curve[-1][1], "wiki_ppl": ppl, "mmlu": mmlu, "curve": curve,
            "train_s": result.train_seconds,
            "wall_s": time.perf_counter() - start, "commit": commit}


def mmlu_accuracy(model, tokenizer, directory: Path | None = None) -> float:
    """Pooled 5-shot accuracy over ``MMLU_SUBJECTS`` (first ``MMLU_LIMIT`` questions of each)."""
    from qlorakit.eval.mmlu import evaluate_mmlu

    result = evaluate_mmlu(model, tokenizer, directory or MMLU_DIR, shots=MMLU_SHOTS, limit=MMLU_LIMIT,
                           subjects=MMLU_SUBJECTS, progress=False)
    return result.as_dict()["accuracy_all"]


def prepare_data(budget: Budget, workdir: Path) -> dict[str, Any]:
    from qlorakit.data import build_datasets
    from qlorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(MODEL))
    train_rows, held_rows = split_by_conversation(read_rows())
    train_path = write_jsonl(workdir / "train.jsonl", train_rows)
    held_path = write_jsonl(workdir / "heldout.jsonl", held_rows[: budget.heldout_examples])
    cfg = run_config(BASELINE, 0, budget, str(train_path), str(workdir))
    train_set, _, _ = build_datasets(cfg.data, tokenizer)
    heldout_set, _, _ = build_datasets(DataConfig(**{**asdict(cfg.data), "paths": (str(held_path),)}), tokenizer)
    print(f"data: {len(train_rows)} train rows / {len(held_rows)} held-out rows "
          f"({len(heldout_set)} held-out examples used)", flush=True)
    return {"tokenizer": tokenizer, "train_path": str(train_path), "train_set": train_set,
            "heldout_set": heldout_set, "wiki_ids": wiki_ids(tokenizer, budget.wiki_tokens)}


# ---- report -------------------------------------------------------------------------------------------------


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    lines = ["| row | seeds | held-out loss | diff to fp32 | wiki ppl | MMLU 5-shot (seeds) | matches 16-bit "
             "| wall s / run |", "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        row = result["rows"].get(name)
        if not row or not row["seeds"]:
            continue
        diff = f"{row['diff_to_fp32']:+.4f} ± {row['diff_spread']:.4f}" if "diff_to_fp32" in row else "n/a"
        match = {True: "yes", False: "no", None: "n/a"}[row.get("matches_16bit")]
        wall = statistics.fmean(row["wall_s"])
        mmlu = (f"{100 * row['mmlu_mean']:.1f}% ± {100 * row['mmlu_std']:.1f} ({row['mmlu_seeds']})"
                if row.get("mmlu_seeds") else "n/a")
        lines.append(f"| {name} | {len(row['seeds'])} | {_fmt(row['heldout_loss_mean'], row['heldout_loss_std'])} "
                     f"| {diff} | {_fmt(row['wiki_ppl_mean'], row['wiki_ppl_std'], 2)} | {mmlu} | {match} "
                     f"| {wall:.0f} |")
    return "\n".join(lines)


def later_commits(result: dict[str, Any]) -> list[str]:
    """A line naming the commits of the rows added after the grid (``ADDED_ROWS``), from each run's ``commit``."""
    parts = [f"`{name}` at {', '.join(f'`{c}`' for c in sorted(set(result['rows'][name].get('commit', []))))}"
             for name in ADDED_ROWS if result["rows"].get(name, {}).get("seeds")]
    if not parts:
        return []
    return ["", "The grid commit is that of the first 18 runs (rows `fp32` to `nf4-dq-qv`); rows added later ran at "
            "their own commits (each run's `commit` in the JSON): " + "; ".join(parts) + "."]


def plot(result: dict[str, Any], path: Path = PLOT) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ROWS:
        row = result["rows"].get(name)
        if not row or not row["curve"]:
            continue
        steps = [s for s, _ in row["curve"][0]]
        per_step = [[c[i][1] for c in row["curve"]] for i in range(len(steps))]
        means = [statistics.fmean(v) for v in per_step]
        lows, highs = [min(v) for v in per_step], [max(v) for v in per_step]
        (line,) = ax.plot(steps, means, marker="o", label=name)
        ax.fill_between(steps, lows, highs, alpha=0.2, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (answer tokens, nats)")
    ax.set_title("SmolLM2-135M on OASST1: held-out loss (mean of seeds, band = min..max)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = save_figure_atomic(fig, path)
    plt.close(fig)
    return out


def render(result: dict[str, Any], doc: Path = DOC, plot_path: Path = PLOT) -> None:
    """Rewrite the generated block of docs/fidelity.md (between the markers) and the plot, from the JSON."""
    begin, end = "<!-- fidelity:begin (benchmarks/fidelity.py --report) -->", "<!-- fidelity:end -->"
    b = result["budget"]
    walls = [w for row in result["rows"].values() for w in row["wall_s"]]
    block = "\n".join([
        begin,
        f"Grid commit `{result['commit']}`; {sum(len(r['seeds']) for r in result['rows'].values())} runs; "
        f"budget: {b['steps']} steps, batch {b['batch_size']} x {b['grad_accum']}, sequence {b['seq_len']} tokens, "
        f"LoRA r {b['r']} alpha {b['alpha']} dropout {b['dropout']}, lr {b['lr']} (full-ft: {b['full_ft_lr']}), "
        f"held-out loss every {b['eval_every']} steps on {b['heldout_examples']} held-out examples, "
        f"wiki perplexity on the first {b['wiki_tokens']} tokens of wiki_demo.txt.",
        *later_commits(result),
        "",
        f"Wall time per run (load + train + evals): median {statistics.median(walls):.0f} s, "
        f"range {min(walls):.0f}-{max(walls):.0f} s." if walls else "No runs yet.",
        "",
        table(result),
        "",
        f"![held-out loss against steps]({plot_path.name})",
        end,
    ])
    text = doc.read_text(encoding="utf-8") if doc.is_file() else f"# Fidelity\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: the markers {begin!r} / {end!r} are missing")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(doc, head + block + tail)
    if walls:
        plot(result, plot_path)
    print(f"wrote {doc}")


# ---- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Budget()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--heldout-examples", type=int, default=d.heldout_examples)
    p.add_argument("--wiki-tokens", type=int, default=d.wiki_tokens)
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--report", action="store_true", help="only re-render the doc and the plot from --out")
    p.add_argument("--add-mmlu", action="store_true",
                   help="rerun recorded (row, seed) pairs without MMLU and add it when the held-out loss reproduces")
    return p.parse_args(argv)


def budget_from(args: argparse.Namespace) -> Budget:
    return Budget(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                  eval_every=args.eval_every, heldout_examples=args.heldout_examples, wiki_tokens=args.wiki_tokens)


def parse_list(text: str, known: dict[str, Any] | None = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if known is not None:
        bad = [t for t in items if t not in known]
        if bad:
            raise SystemExit(f"unknown row(s) {bad}; known: {', '.join(known)}")
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        render(summarize(json.loads(args.out.read_text(encoding="utf-8"))), args.doc, args.doc.parent / PLOT.name)
        return 0
    budget = budget_from(args)
    rows, seeds = parse_list(args.rows, ROWS), [int(s) for s in parse_list(args.seeds)]
    result = load_result(args.out, budget)
    if args.add_mmlu:
        return fill_mmlu(result, rows, budget, args)
    todo = pending(result, rows, seeds)
    print(cpu_header(vector_flags()), flush=True)
    print(f"{len(todo)} run(s) to do: {todo}", flush=True)
    if not todo:
        return 0
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        data = prepare_data(budget, Path(tmp))
        for row, seed in todo:
            run = run_one(row, seed, budget, data, Path(tmp))
            record(result, row, seed, run)
            write_json_atomic(args.out, summarize(result))
            print(f"{row} seed {seed}: held-out {run['heldout_loss']:.4f}, wiki ppl {run['wiki_ppl']:.2f}, "
                  f"wall {run['wall_s']:.0f} s (train {run['train_s']:.0f} s)", flush=True)
    render(result, args.doc, args.doc.parent / PLOT.name)
    return 0


def fill_mmlu(result: dict[str, Any], rows: list[str], budget: Budget, args: argparse.Namespace) -> int:
    """``--add-mmlu``: rerun the recorded pairs without MMLU, seed-major; the JSON is rewritten after each."""
    todo = missing_mmlu(result, rows)
    print(cpu_header(vector_flags()), flush=True)
    print(f"{len(todo)} rerun(s) for MMLU: {todo}", flush=True)
    refused = 0
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        data = prepare_data(budget, Path(tmp)) if todo else {}
        for row, seed in todo:
            run = run_one(row, seed, budget, data, Path(tmp))
            i = result["rows"][row]["seeds"].index(seed)
            recorded = result["rows"][row]["heldout_loss"][i]
            if add_mmlu(result, row, seed, run):
                write_json_atomic(args.out, summarize(result))
                print(f"{row} seed {seed}: held-out {run['heldout_loss']:.6f} reproduced, MMLU {run['mmlu']:.3f}, "
                      f"wall {run['wall_s']:.0f} s", flush=True)
            else:
                refused += 1
                print(f"{row} seed {seed}: held-out {run['heldout_loss']:.6f} != recorded {recorded:.6f}; "
                      "MMLU not recorded", flush=True)
    render(result, args.doc, args.doc.parent / PLOT.name)
    return 1 if refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
