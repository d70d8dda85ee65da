"""Data-parallel training on CPU: 1 process against N gloo ranks (DDP and FSDP), SmolLM2-135M, one thread per rank.

    python benchmarks/distributed.py [--ranks 2 --steps 6 --warmup 2 --repeats 1 --batch-size 4 --seq-len 128
                                      --strategies ddp,fsdp]

Both sides run ``qlorakit train`` itself on the same model (the shared SmolLM2-135M GGUF), data (the
bundled OASST1 sample), seed and job batch (``--batch-size`` is the micro-batch of the whole job, so the N
ranks each take ``batch_size / N``): ``python -m qlorakit train`` for 1 process and ``torchrun
--nproc-per-node N -m qlorakit train --distributed ddp|fsdp`` for N ranks, with ``OMP_NUM_THREADS=1`` for
every process. LoRA r 16, dropout 0, AdamW, fp32, gradient checkpointing on. FSDP loads the whole model on
every rank and then shards it (load-all-then-shard): the peak RSS per rank includes that load.

Read from each run's ``metrics.jsonl`` (rank 0 writes it): the job's tokens/s per step (``tokens_per_s``:
all ranks' input tokens over the step's wall time) without the first ``--warmup`` steps, its median; every
rank's peak RSS (``rank_peak_rss_mb``, or ``peak_rss_mb`` for one process); the losses, which must agree
between the two sides to fp32 rounding (the same global batches). Medians over ``--repeats`` runs
(alternating sides). Prints one table and writes one JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import cpu_header, cpu_model, git_head, vector_flags, write_result

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = REPO / "benchmarks/results/distributed.json"


def _train_args(args: argparse.Namespace, out: Path) -> list[str]:
    return ["-m", "qlorakit", "train", "--model", str(args.model), "--output-dir", str(out), "--overwrite",
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", "1",
            "--max-seq-len", str(args.seq_len), "--lora-r", "16", "--lora-dropout", "0", "--optim", "adamw",
            "--compute-dtype", "float32", "--val-size", "0", "--no-progress", "--warmup-ratio", "0"]


def run_side(args: argparse.Namespace, ranks: int, out: Path, strategy: str = "ddp") -> dict:
    """One training run (1 process, or ``ranks`` under torchrun); its measurements from metrics.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    python = [sys.executable]
    if ranks > 1:
        python += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(args.port)]
    cmd = python + _train_args(args, out) + (["--distributed", strategy] if ranks > 1 else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    timed = steps[args.warmup:]
    rss = steps[-1].get("rank_peak_rss_mb", [steps[-1]["peak_rss_mb"]])
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed), "rank_peak_rss_mb": rss,
            "losses": [r["loss"] for r in steps]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=GGUF)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--strategies", default="ddp,fsdp", help="comma-separated: ddp, fsdp (the N-rank sides)")
    args = p.parse_args()
    print(cpu_header(vector_flags()))
    work = Path(tempfile.mkdtemp(prefix="qlorakit-dist-bench-"))
    strategies = [s for s in args.strategies.split(",") if s]
    runs: dict[str, list[dict]] = {"1 process": [], **{f"{args.ranks} ranks {s}": [] for s in strategies}}
    for repeat in range(args.repeats):
        runs["1 process"].append(run_side(args, 1, work / f"one-{repeat}"))
        for s in strategies:
            runs[f"{args.ranks} ranks {s}"].append(run_side(args, args.ranks, work / f"{s}-{repeat}", s))
    summary = {}
    for side, side_runs in runs.items():
        summary[side] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in side_runs),
                         "rank_peak_rss_mb": [statistics.median(r["rank_peak_rss_mb"][i] for r in side_runs)
                                              for i in range(len(side_runs[0]["rank_peak_rss_mb"]))]}
    one = runs["1 process"][0]["losses"]
    max_rel, ratio = {}, {}
    print(f"{'side':<18}{'tokens/s':>10}  peak RSS per rank (MiB)")
    for side, s in summary.items():
        print(f"{side:<18}{s['tokens_per_s']:>10.1f}  {', '.join(f'{x:.0f}' for x in s['rank_peak_rss_mb'])}")
    for side in runs:
        if side == "1 process":
            continue
        many = runs[side][0]["losses"]
        max_rel[side] = max(abs(a - b) / abs(a) for a, b in zip(one, many, strict=True))
        ratio[side] = summary[side]["tokens_per_s"] / summary["1 process"]["tokens_per_s"]
        print(f"ratio {side} / 1 process: {ratio[side]:.2f}x tokens/s; losses agree to {max_rel[side]:.1e} "
              "(relative)")
    write_result(args.output, {
        "benchmark": "distributed", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_head": git_head(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "ratio_tokens_per_s": ratio,
        "loss_max_rel_diff": max_rel, "runs": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
