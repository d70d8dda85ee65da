"""Data-parallel training on CPU: 1 process against N gloo ranks (DDP and FSDP), SmolLM2-135M, one thread per rank.

    python benchmarks/distributed.py [--ranks 2 --steps 6 --warmup 2 --repeats 1 --batch-size 4 --seq-len 128
                                      --strategies ddp,fsdp]
    python benchmarks/distributed.py --load-only [--ranks 2 --repeats 2 --load-modes whole,stream,broadcast]

Both sides run ``qlorakit train`` itself on the same model (the shared SmolLM2-135M GGUF), data (the
bundled OASST1 sample), seed and job batch (``--batch-size`` is the micro-batch of the whole job, so the N
ranks each take ``batch_size / N``): ``python -m qlorakit train`` for 1 process and ``torchrun
--nproc-per-node N -m qlorakit train --distributed ddp|fsdp`` for N ranks, with ``OMP_NUM_THREADS=1`` for
every process. LoRA r 16, dropout 0, AdamW, fp32, gradient checkpointing on. FSDP loads as ``--fsdp-load``'s
default says (``broadcast``: no rank holds the whole 4-bit base); the peak RSS per rank includes the load.

``--load-only`` measures the FSDP load instead (``--fsdp-load``, ``parallel.fsdp_load``; written to
``benchmarks/results/distributed_load.json``): for each mode, ``torchrun --nproc-per-node N`` runs this script's
``--load-child`` on every rank (one thread each), which joins the group, loads the model as ``qlorakit train
--distributed fsdp`` does (``cli.train_cmd.load_for_run``, LoRA r 16, fp32) and shards it (``fully_shard_model``,
as the trainer's start does). Each rank reports its RSS before the load (the interpreter, torch and
transformers imported), its peak RSS over load + shard (``ru_maxrss``), its RSS once loaded (before
``fully_shard``) and at the end, the seconds of the load and of the shard, and the 4-bit linear bytes it holds
(codes + absmax rows) against the whole model's. ``whole`` is the path from before this option (every rank
loads everything, then shards); a one-process load (``load_model``) is the reference row. Medians over
``--repeats`` (modes alternating).

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
LOAD_OUTPUT = REPO / "benchmarks/results/distributed_load.json"


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


def load_child(args: argparse.Namespace) -> int:
    """One rank of ``--load-only`` (under torchrun; one process when ``--load-child one``): load, shard, report."""
    import time

    import torch
    import transformers  # noqa: F401  (imported before the baseline reading, as the load imports it)

    from qlorakit.cli.train_cmd import load_for_run
    from qlorakit.config import LoraConfig, ParallelConfig, RunConfig
    from qlorakit.hardware import current_rss_mb, peak_rss_mb
    from qlorakit.models.memory import trim_heap
    from qlorakit.parallel import init_from_env, shutdown
    from qlorakit.parallel.fsdp import local, shard_for_training
    from qlorakit.quant.linear import Linear4bit

    torch.set_num_threads(1)
    one = args.load_child == "one"
    dist_info = None if one else init_from_env("fsdp", 600)
    mode = "whole" if one else args.load_child
    cfg = RunConfig(model=str(args.model), lora=LoraConfig(r=16, dropout=0.0),
                    parallel=ParallelConfig(distributed="fsdp", fsdp_load=mode))
    trim_heap()
    before = current_rss_mb()
    started = time.perf_counter()
    model = load_for_run(cfg, None if one else "fsdp", dist_info, torch.float32)
    load_s = time.perf_counter() - started
    trim_heap()
    loaded = current_rss_mb()  # the model in place, before fully_shard
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    whole_bytes = sum(_linear_bytes(m) for m in linears) if one or mode == "whole" else None
    started = time.perf_counter()
    if not one:
        trainable = [p for p in model.parameters() if p.requires_grad]
        shard_for_training(model, trainable, dist_info.world_size, dist_info.rank, torch.float32)
    shard_s = time.perf_counter() - started
    trim_heap()
    held = sum(local(m.packed_rows).nbytes + local(m.absmax_rows).nbytes for m in linears) if not one else whole_bytes
    report = {"rank": 0 if one else dist_info.rank, "rss_before_mb": before, "rss_loaded_mb": loaded,
              "peak_rss_mb": peak_rss_mb(),
              "rss_end_mb": current_rss_mb(), "load_s": load_s, "shard_s": shard_s, "linear_bytes_held": held,
              "linear_bytes_whole": whole_bytes}
    Path(args.child_out, f"rank{report['rank']}.json").write_text(json.dumps(report))
    if not one:
        shutdown()
    return 0


def _linear_bytes(m) -> int:
    """Codes + absmax (+ nested absmax) bytes of one whole 4-bit linear."""
    q = m.qweight
    return q.packed.nbytes + q.absmax.nbytes + (q.nested.absmax.nbytes if q.nested is not None else 0)


def run_load(args: argparse.Namespace, mode: str, out: Path) -> list[dict]:
    """One ``--load-only`` measurement: every rank's report (one process for ``mode`` "one")."""
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    python = [sys.executable]
    if mode != "one":
        python += ["-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-port", str(args.port)]
    cmd = python + [str(Path(__file__).resolve()), "--load-child", mode, "--model", str(args.model),
                    "--child-out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


def load_only(args: argparse.Namespace) -> int:
    modes = ["one"] + [m for m in args.load_modes.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="qlorakit-dist-load-"))
    load_before = os.getloadavg()
    runs: dict[str, list[list[dict]]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        for mode in modes:
            runs[mode].append(run_load(args, mode, work / f"{mode}-{repeat}"))
    keys = ("rss_before_mb", "peak_rss_mb", "rss_loaded_mb", "rss_end_mb", "load_s", "shard_s", "linear_bytes_held")
    summary = {}
    for mode, reps in runs.items():
        ranks = len(reps[0])
        summary[mode] = {k: [statistics.median(r[i][k] for r in reps) for i in range(ranks)] for k in keys}
        summary[mode]["peak_minus_before_mb"] = [p - b for p, b in zip(summary[mode]["peak_rss_mb"],
                                                                        summary[mode]["rss_before_mb"], strict=True)]
    whole_bytes = runs["one"][0][0]["linear_bytes_whole"]
    print(f"4-bit linears of the whole model: {whole_bytes / 2**20:.1f} MiB (codes + absmax + nested absmax)")
    print(f"{'load':<12}{'rank':>5}{'before MiB':>12}{'peak MiB':>10}{'peak-before':>13}{'loaded MiB':>12}"
          f"{'end MiB':>9}{'load s':>8}{'shard s':>9}{'linears held MiB':>18}")
    for mode, s in summary.items():
        for i in range(len(s["peak_rss_mb"])):
            print(f"{mode if i == 0 else '':<12}{i:>5}{s['rss_before_mb'][i]:>12.0f}{s['peak_rss_mb'][i]:>10.0f}"
                  f"{s['peak_minus_before_mb'][i]:>13.0f}{s['rss_loaded_mb'][i]:>12.0f}{s['rss_end_mb'][i]:>9.0f}"
                  f"{s['load_s'][i]:>8.1f}"
                  f"{s['shard_s'][i]:>9.1f}{s['linear_bytes_held'][i] / 2**20:>18.1f}")
    write_result(args.output, {
        "benchmark": "distributed_load", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_head": git_head(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "settings": {k: str(v) for k, v in vars(args).items()}, "linear_bytes_whole": whole_bytes,
        "summary": summary, "runs": runs,
    })
    return 0


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
    p.add_argument("--load-only", action="store_true", help="measure the FSDP load (--fsdp-load) instead of training")
    p.add_argument("--load-modes", default="whole,stream,broadcast", help="comma-separated --fsdp-load values")
    p.add_argument("--load-child", help=argparse.SUPPRESS)  # one rank of --load-only (a mode, or "one")
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load_child:
        return load_child(args)
    print(cpu_header(vector_flags()))
    if args.load_only:
        if args.output == DEFAULT_OUTPUT:
            args.output = LOAD_OUTPUT
        return load_only(args)
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
