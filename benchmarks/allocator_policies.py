"""Allocator policies of a training step: page faults, system time, step time and peak RSS (a script).

    python benchmarks/allocator_policies.py [--policies fixed-1m,dynamic,trim,thp-1m --rounds 2 --steps 3]

Each run is a fresh interpreter (round-robin over the policies, ``--rounds`` times, so a change in the load
of a shared machine falls on every policy alike) that loads SmolLM2-135M (the GGUF) in NF4 + DQ with LoRA
r 16 (alpha 16, dropout 0.05, all linears), tokenizes the bundled OASST1 sample at ``--seq-len`` tokens and
trains ``--steps`` steps of ``--batch-size`` examples with ``qlorakit.train.train`` (fp32, paged AdamW,
checkpointing per ``--checkpointing``, its other defaults), one thread. A global optimizer step hook reads
``getrusage`` after every step; the first step is left out (warm-up), the rest give minor page faults,
user and system seconds and wall seconds per step. Peak RSS is the child's ``ru_maxrss``. The speed ratio is
of CPU seconds (user + sys) per step, which a shared machine's load disturbs far less than the wall time.

Policies (``train.allocator.POLICIES`` names the ones the library offers):

- ``fixed-1m``: ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` before the model loads (the default before issue 14);
- ``dynamic``: glibc left alone (its threshold rises to the largest freed mmapped block, up to 32 MiB);
- ``trim``: ``dynamic`` + ``malloc_trim(0)`` after every optimizer step (free heap pages go back to the OS);
- ``thp-1m``: ``fixed-1m`` with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc madvises its mmapped blocks
  for transparent huge pages: one fault per 2 MiB instead of per 4 KiB, where the kernel's THP mode is
  ``madvise``);
- ``thp-trim``: ``trim`` with the same tunable (the heap madvised for huge pages too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import cpu_header, git_head, run_child, vector_flags, write_result

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = REPO / "benchmarks/results/allocator_policies.json"
THP_TUNABLE = "glibc.malloc.hugetlb=1"
#: policy -> (mmap threshold KiB given to the library (0: glibc's dynamic one), trim after each step, THP tunable)
POLICIES = {"fixed-1m": (1024, False, False), "dynamic": (0, False, False), "trim": (0, True, False),
            "thp-1m": (1024, False, True), "thp-trim": (0, True, True), "thp-dynamic": (0, False, True),
            "trim-4m": (4096, True, False), "trim-2m": (2048, True, False)}


def _usage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"minflt": r.ru_minflt, "majflt": r.ru_majflt, "user_s": r.ru_utime, "sys_s": r.ru_stime,
            "wall_s": time.perf_counter()}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One training run under ``args.worker``'s policy, measured after every optimizer step."""
    kib, trim, _ = POLICIES[args.worker]
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if kib:
        libc.mallopt(-3, ctypes.c_int(kib * 1024))  # M_MMAP_THRESHOLD, before anything large is allocated
    import torch

    torch.set_num_threads(1)
    from qlorakit.config import DataConfig, LoraConfig, MemoryConfig, RunConfig, TrainConfig
    from qlorakit.data import build_datasets, collate_fn, default_sample_path
    from qlorakit.models import load_model, load_tokenizer
    from qlorakit.train import train

    lora = LoraConfig(r=16, alpha=16, dropout=0.05)
    cfg = RunConfig(model=args.model, lora=lora,
                    data=DataConfig(paths=(str(default_sample_path()),), max_seq_len=args.seq_len, val_size=0),
                    train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                                      compute_dtype="float32", logging_steps=1, save_steps=0),
                    memory=MemoryConfig(gradient_checkpointing=args.checkpointing == "on",
                                        malloc_mmap_threshold_kib=kib))  # fmt: skip
    tokenizer = load_tokenizer(args.model)
    train_set, _, _ = build_datasets(cfg.data, tokenizer)
    torch.manual_seed(0)
    model = load_model(args.model, quant=cfg.quant, lora=lora, compute_dtype=torch.float32)
    after_load_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    marks: list[dict[str, float]] = []

    def after_step(optimizer, *_):
        if trim:
            libc.malloc_trim(0)
        marks.append(_usage())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(after_step)
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, train_set, [], collate_fn(tokenizer), cfg, Path(run_dir), progress=False)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    handle.remove()
    steps = [{k: b[k] - a[k] for k in a} for a, b in zip(marks, marks[1:], strict=False)]
    tokens = [r["tokens"] for r in rows if "loss" in r]
    timed_tokens = tokens[-1] - tokens[0]
    per = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
    return {"policy": args.worker, "steps": steps, "per_step": per, "tokens_per_s": timed_tokens / sum(
        s["wall_s"] for s in steps), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_after_load_mib": after_load_mib, "losses": [r["loss"] for r in rows if "loss" in r]}  # fmt: skip


def _child(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    env = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if POLICIES[policy][2]:
        env["GLIBC_TUNABLES"] = THP_TUNABLE
    return run_child(__file__, [*args.argv, "--worker", policy], env=env)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarize(runs: dict[str, list[dict[str, Any]]], reference: str) -> dict[str, dict[str, float]]:
    out = {}
    for policy, rs in runs.items():
        out[policy] = {"minflt_per_step": _median([r["per_step"]["minflt"] for r in rs]),
                       "sys_s_per_step": _median([r["per_step"]["sys_s"] for r in rs]),
                       "user_s_per_step": _median([r["per_step"]["user_s"] for r in rs]),
                       "cpu_s_per_step": _median([r["per_step"]["user_s"] + r["per_step"]["sys_s"] for r in rs]),
                       "wall_s_per_step": _median([r["per_step"]["wall_s"] for r in rs]),
                       "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
                       "peak_rss_mib": _median([r["peak_rss_mib"] for r in rs])}  # fmt: skip
    ref = out.get(reference)
    for row in out.values():
        row["speed_vs_ref"] = ref["cpu_s_per_step"] / row["cpu_s_per_step"] if ref else float("nan")
        row["wall_speed_vs_ref"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        row["peak_vs_ref"] = row["peak_rss_mib"] / ref["peak_rss_mib"] if ref else float("nan")
    return out


def print_table(summary: dict[str, dict[str, float]], reference: str) -> None:
    head = (f"{'policy':<12}{'faults/step':>13}{'sys s/step':>12}{'user s/step':>13}{'CPU s/step':>12}{'s/step':>9}"
            f"{'tok/s':>8}{'peak MiB':>10}{'speed x':>9}{'peak x':>8}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for policy, r in summary.items():
        print(f"{policy:<12}{r['minflt_per_step']:>13,.0f}{r['sys_s_per_step']:>12.2f}{r['user_s_per_step']:>13.2f}"
              f"{r['cpu_s_per_step']:>12.2f}{r['wall_s_per_step']:>9.2f}{r['tokens_per_s']:>8.1f}{r['peak_rss_mib']:>10.0f}"
              f"{r['speed_vs_ref']:>9.2f}{r['peak_vs_ref']:>8.2f}")  # fmt: skip
    print(f"medians over rounds; ratios against {reference}; speed x = its CPU s/step (user + sys) / this one's "
          "(on a shared machine the wall time is mostly other jobs' load)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=str(GGUF))
    p.add_argument("--policies", default="fixed-1m,dynamic,trim,thp-1m", help=f"comma list of {sorted(POLICIES)}")
    p.add_argument("--rounds", type=int, default=2, help="runs per policy, round-robin (median)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is left out")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--worker", choices=tuple(POLICIES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is left out)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    print(cpu_header(vector_flags()), flush=True)
    load_start, started = os.getloadavg(), time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for round_ in range(args.rounds):
        for policy in policies:
            run = _child(args, policy)
            runs[policy].append(run)
            ps = run["per_step"]
            print(f"  {round_ + 1}/{args.rounds} {policy:<11}: {ps['minflt']:,.0f} faults/step, sys {ps['sys_s']:.2f} "
                  f"s, {ps['wall_s']:.2f} s/step, peak {run['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    summary = summarize(runs, policies[0])
    print_table(summary, policies[0])
    write_result(args.output, {
        "benchmark": "allocator_policies", "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/allocator_policies.py", *args.argv]), "git_head": git_head(),
        "cpu": cpu_header(vector_flags()), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "config": {k: v for k, v in vars(args).items() if k not in ("argv", "worker", "output")} | {
            "output": str(args.output)},
        "summary": summary, "runs": runs, "total_seconds": time.perf_counter() - started})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
