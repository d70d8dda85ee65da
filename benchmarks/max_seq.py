"""Longest sequence that trains within a peak-RSS budget: qlorakit vs transformers + bitsandbytes + peft (a script).

    python benchmarks/max_seq.py [--budget-mib 4096 --start 1024 --max-seq 16384 --resolution 256 --threads 1]

A probe is one full optimizer step (forward, backward, clip, AdamW) on one sequence of ``L`` random tokens
(seeded; every token is a target, which is the worst case for qlorakit's target-rows-only loss) in a fresh
interpreter, with both stacks set up as in ``train_throughput.py`` (SmolLM2-135M, NF4 + DQ, LoRA r 16 on
all block linears, dropout 0, the same ``--dtype``). The peer runs with gradient checkpointing ON (its
memory-lean setting). qlorakit, the headline (``--ours-mode cli``), is ``qlorakit train --memory-budget
<--budget-mib>`` itself with only model, data, shape and dtype flags: its budget planner picks checkpointing
(all blocks, some, or none), the allocator, paging and the loss chunk that fit, as a user's run would. Its data
is one block of ``L`` tokens of ``shared/data/text/tinyshakespeare.txt`` (``--block-size L``, every token a
target). ``--ours-mode library`` runs ``qlorakit.train.train`` with checkpointing on and the library's
defaults otherwise (the mode of the runs before 2026-12). The driver polls the child's resident
set (``/proc/<pid>/status``) every 50 ms and stops it as soon as it passes the budget; a probe that
finishes reports its own ``ru_maxrss``. Search: double ``L`` from ``--start`` until a probe exceeds the
budget (or ``--max-seq``), then bisect to ``--resolution`` tokens. Prints one table, writes one JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt
from _harness import last_json_line, run_child, write_result

DEFAULT_OUTPUT = tt.REPO / "benchmarks/results/max_seq.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-max-seq"
TEXT = tt.REPO.parent / "shared/data/text/tinyshakespeare.txt"  # ~300k tokens: blocks up to 16,384 and more


def _example(length: int, vocab: int) -> dict[str, list[int]]:
    import torch

    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(tt.SEED)).tolist()
    return {"input_ids": ids, "labels": ids}


def probe_ours(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """One qlorakit training step on one sequence of ``args.probe_len`` tokens."""
    from functools import partial

    import torch

    from qlorakit.config import (
        DataConfig,
        LoraConfig,
        MemoryConfig,
        OptimConfig,
        QuantConfig,
        RunConfig,
        TrainConfig,
    )
    from qlorakit.data import collate
    from qlorakit.models import load_model
    from qlorakit.train import train

    lora = LoraConfig(r=tt.RANK, alpha=tt.ALPHA, dropout=0.0, targets=tt.TARGETS)
    model = load_model(model_dir, quant=QuantConfig(), lora=lora, compute_dtype=getattr(torch, args.dtype))
    # packing off: the probe is ONE sequence of L tokens (packing would cut it into rows of max_seq_len)
    cfg = RunConfig(model=model_dir, lora=lora, data=DataConfig(seed=tt.SEED, packing=False), train=TrainConfig(
        max_steps=1, batch_size=1, grad_accum=1, compute_dtype=args.dtype, seed=tt.SEED),
        optim=OptimConfig(lr=tt.LR, warmup_ratio=0.0, max_grad_norm=tt.CLIP, optim="adamw"),
        memory=MemoryConfig(gradient_checkpointing=True))  # fmt: skip
    example = _example(args.probe_len, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(model, [example], [], partial(collate, pad_id=0), cfg, Path(run_dir), progress=False)
    return {"loss": result.losses[0]}


def probe_ours_cli(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """``qlorakit train --memory-budget <budget>`` on one block of ``args.probe_len`` text tokens, one step."""
    from qlorakit.cli.main import main as qlorakit_main

    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["train", "--model", model_dir, "--data", str(TEXT), "--block-size", str(args.probe_len),
                "--max-seq-len", str(args.probe_len), "--batch-size", "1", "--grad-accum", "1", "--max-steps", "1",
                "--val-size", "0", "--lora-r", str(tt.RANK), "--lora-alpha", str(tt.ALPHA), "--lora-dropout", "0",
                "--lr", str(tt.LR), "--warmup-ratio", "0", "--compute-dtype", args.dtype,
                "--memory-budget", f"{int(args.budget_mib)}MiB", "--output-dir", run_dir, "--overwrite",
                "--no-progress"]  # fmt: skip
        status = qlorakit_main(argv)
        if status != 0:
            raise RuntimeError(f"qlorakit train exited with {status}")
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        chosen = (Path(run_dir) / "config.yaml").read_text()
    import yaml

    config = yaml.safe_load(chosen)  # what the planner chose, as the run wrote it
    return {"loss": next(r["loss"] for r in rows if "loss" in r), "argv": argv[1:],
            "memory_config": config["memory"], "optim": config["optim"]["optim"]}  # fmt: skip


def probe_theirs(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """One step of the standard stack (full-logits loss, checkpointing on) on the same sequence."""
    import torch

    from qlorakit.data import collate
    from qlorakit.train.loss import reference_loss_sum

    model = tt._peer_model(model_dir, None, args.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tt.LR, weight_decay=0.0)
    torch.set_flush_denormal(True)
    model.train()
    batch = collate([_example(args.probe_len, model.config.vocab_size)], pad_id=0)
    loss_sum, n = reference_loss_sum(model, batch)
    (loss_sum / n).backward()
    torch.nn.utils.clip_grad_norm_(params, tt.CLIP)
    optimizer.step()
    return {"loss": float(loss_sum) / n}


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers  # noqa: F401 — imported by both stacks

    torch.set_num_threads(args.threads)
    from qlorakit.hardware import peak_rss_mb

    started = time.perf_counter()
    probe = {"theirs": probe_theirs, "ours": probe_ours_cli if args.ours_mode == "cli" else probe_ours}[args.probe]
    run = probe(args, args.model_dir)
    return {**run, "seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mb()}


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0


def run_probe(args: argparse.Namespace, stack: str, length: int, model_dir: str) -> dict[str, Any]:
    """A fresh child for one probe; stopped once its RSS passes the budget."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--probe", stack, "--probe-len", str(length),
           "--model-dir", model_dir]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
    started, seen = time.perf_counter(), 0.0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        while proc.poll() is None:
            seen = max(seen, _rss_mib(proc.pid))
            if seen > args.budget_mib:
                proc.kill()
                proc.wait()
                return {"seq": length, "ok": False, "why": "over budget", "rss_seen_mib": seen,
                        "seconds": time.perf_counter() - started}  # fmt: skip
            time.sleep(0.05)
        out, err = proc.communicate()
    if proc.returncode != 0:
        return {"seq": length, "ok": False, "why": err.strip().splitlines()[-1] if err.strip() else "failed",
                "rss_seen_mib": seen, "seconds": time.perf_counter() - started}  # fmt: skip
    result = last_json_line(out, f"probe {stack} L={length}")
    ok = result["peak_rss_mib"] <= args.budget_mib
    return {"seq": length, "ok": ok, "why": "" if ok else "over budget", "rss_seen_mib": seen, **result}


def search(args: argparse.Namespace, stack: str, model_dir: str) -> tuple[int, list[dict[str, Any]]]:
    """Double, then bisect: the longest ``L`` (multiple of ``--resolution``) whose probe stays within budget."""
    probes: list[dict[str, Any]] = []

    def fits(length: int) -> bool:
        probes.append(run_probe(args, stack, length, model_dir))
        p = probes[-1]
        m = p.get("memory_config")  # ours in cli mode: what its planner chose
        ckpt = "" if not m else ("off" if not m["gradient_checkpointing"] else
                                 f"first {m['checkpoint_blocks']} blocks" if m["checkpoint_blocks"] else "all blocks")
        chose = f" (checkpointing {ckpt}, loss chunk {m['loss_chunk_tokens']}, {p['optim']})" if m else ""
        print(f"  {stack:<6} L={length:>6}: {'ok ' if p['ok'] else 'NO '} "
              f"peak {p.get('peak_rss_mib', p['rss_seen_mib']):.0f} MiB, {p['seconds']:.0f} s {p['why']}{chose}",
              flush=True)  # fmt: skip
        return p["ok"]

    good, bad = 0, None
    length = args.start
    while length <= args.max_seq:
        if not fits(length):
            bad = length
            break
        good, length = length, length * 2
    if bad is None:
        return good, probes  # every probe up to --max-seq fitted: the answer is at least ``good``
    while bad - good > args.resolution:
        mid = (good + bad) // 2 // args.resolution * args.resolution
        if mid in (good, bad):
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, probes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=str(tt.GGUF), help="the GGUF to convert once to fp32 safetensors")
    p.add_argument("--budget-mib", type=float, default=4096.0, help="peak RSS budget per training process")
    p.add_argument("--start", type=int, default=1024, help="first sequence length probed")
    p.add_argument("--max-seq", type=int, default=16384, help="longest sequence length probed")
    p.add_argument("--resolution", type=int, default=256, help="bisection stops at this many tokens")
    p.add_argument("--dtype", choices=tuple(tt.DTYPES), default="float32", help="compute dtype of BOTH stacks")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ours-mode", choices=("cli", "library"), default="cli",
                   help="cli: qlorakit train --memory-budget (the headline); library: train() with checkpointing on")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache of the converted model")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--probe", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--probe-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.probe or args.convert:
        print(json.dumps(child(args) if args.probe else str(tt.convert_once(args.model, args.workdir))))
        return 0
    started = time.perf_counter()
    model_dir = run_child(__file__, [*args.argv, "--convert"])
    longest, probes = {}, {}
    for stack in ("ours", "theirs"):
        longest[stack], probes[stack] = search(args, stack, model_dir)
    capped = {s: all(p["ok"] for p in probes[s]) for s in longest}
    ours = ("qlorakit train --memory-budget: its planner's choice" if args.ours_mode == "cli"
            else "library, checkpointing on")
    print(f"{'stack':<22}{'longest L':>10}{'probes':>8}   (budget {args.budget_mib:.0f} MiB peak RSS, {args.dtype}, "
          f"{args.threads} threads, batch 1; peer checkpointing on; ours {ours})")  # fmt: skip
    for stack, name in (("ours", "qlorakit"), ("theirs", "transformers+bnb+peft")):
        mark = f">= {longest[stack]}" if capped[stack] else str(longest[stack])
        print(f"{name:<22}{mark:>10}{len(probes[stack]):>8}")
    ratio = longest["ours"] / longest["theirs"] if longest["theirs"] else float("inf")
    print(f"{'ours / theirs':<22}{ratio:>10.2f}" + ("   (ours capped by --max-seq)" if capped["ours"] else ""))
    write_result(args.output, {
        "benchmark": "max_seq", "description": __doc__.split("\n", 1)[0], "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/max_seq.py", *args.argv]), "environment": tt._environment(args),
        "config": {"budget_mib": args.budget_mib, "start": args.start, "max_seq": args.max_seq,
                   "resolution": args.resolution, "dtype": args.dtype, "batch_size": 1, "ours_mode": args.ours_mode,
                   "gradient_checkpointing": {"theirs": True, "ours": "planner" if args.ours_mode == "cli" else True},
                   "lora_r_alpha_dropout": [tt.RANK, tt.ALPHA, 0.0], "targets": tt.TARGETS},
        "longest_seq": longest, "capped_by_max_seq": capped, "ratio_ours_over_theirs": ratio, "probes": probes,
        "total_seconds": time.perf_counter() - started,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
