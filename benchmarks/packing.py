"""Packing on the quickstart: padding, seconds per step and real tokens/s, packed vs unpacked (a script).

    python benchmarks/packing.py [--steps 5 --repeats 2 --threads 1]

Every run is the default ``qlorakit train`` configuration (the quickstart override: the bundled OASST1 sample,
32 held out, 256 + 256 tokens so rows of 512, batch 4, r 16, compute dtype auto) for ``--steps`` optimizer steps
in a fresh interpreter, trained by ``qlorakit.train.train`` without the held-out evaluations (they are
unpacked either way and not timed by the trainer). Sides, alternating (packed, unpacked, mask, packed, ...):

- ``packed``: ``data.packing`` on, the default (CPU sdpa: the ``varlen_attention`` rewrite, SDPA per example);
- ``unpacked``: ``--no-packing`` (examples right-padded per micro-batch, as before packing existed);
- ``mask``: packing on without the ``varlen_attention`` row, so transformers builds the block-diagonal mask.

Timed: the trainer's own per-step clock (``metrics.jsonl``) without the first step; tokens/s counts real
(non-padding) tokens. A packed micro-batch holds more examples (batch counts rows), so seconds per step and
examples per step are reported beside tokens/s. The data part (no model) gives the padding share of the first
epoch's micro-batches, packed and unpacked. Prints one table, writes one JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, cpu_header, git_head, run_child, vector_flags, write_result

DEFAULT_OUTPUT = REPO / "benchmarks/results/packing.json"
SIDES = ("packed", "unpacked", "mask")


def _quickstart_config(side: str, steps: int, run_dir: str):
    import dataclasses

    from qlorakit.cli.main import build_parser
    from qlorakit.cli.train_cmd import build_config
    from qlorakit.data import default_sample_path

    flags = ["train", "--output-dir", run_dir, "--no-progress", "--no-packing" if side == "unpacked" else "--packing"]
    cfg, _ = build_config(build_parser().parse_args(flags))  # no data/step flags: the quickstart override applies
    data = dataclasses.replace(cfg.data, paths=(str(default_sample_path()),))
    return dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, max_steps=steps))


def child_data() -> dict[str, Any]:
    """Padding of the first epoch, packed and unpacked, and the rows (tokenizer only)."""
    from qlorakit.data import batch_order, build_datasets
    from qlorakit.data.packing import PackedDataset, padding_fraction
    from qlorakit.models import load_tokenizer

    cfg = _quickstart_config("packed", 1, tempfile.mkdtemp())
    train_set, _, _ = build_datasets(cfg.data, load_tokenizer(cfg.model))
    packed = PackedDataset(train_set, cfg.data.seq_limit)
    d, t = cfg.data, cfg.train

    def padding(lengths):
        return padding_fraction(lengths, batch_order(lengths, t.batch_size, d.seed, 0, d.group_by_length))

    return {"examples": len(train_set), "rows": len(packed), "row_len": d.seq_limit, "batch_size": t.batch_size,
            "padding_unpacked": padding(train_set.lengths), "padding_packed": padding(packed.lengths),
            "fill": packed.stats.fill, "cut_examples": packed.stats.cut_examples}


def child_run(side: str, steps: int, threads: int) -> dict[str, Any]:
    import torch

    from qlorakit.data import build_datasets, collate_fn
    from qlorakit.hardware import resolve_dtype
    from qlorakit.models import load_model, load_tokenizer
    from qlorakit.train import rewrites, train
    from qlorakit.train.rewrites import fix_allocator

    torch.set_num_threads(threads)
    if side == "mask":
        rewrites.REWRITES = tuple(r for r in rewrites.REWRITES if r.name != "varlen_attention")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _quickstart_config(side, steps, run_dir)
        fix_allocator(cfg)
        tokenizer = load_tokenizer(cfg.model)
        train_set, _, _ = build_datasets(cfg.data, tokenizer)
        torch.manual_seed(cfg.train.seed)
        dtype = resolve_dtype(cfg.train.compute_dtype)
        model = load_model(cfg.model, quant=cfg.quant, lora=cfg.lora, compute_dtype=dtype)
        train(model, train_set, [], collate_fn(tokenizer), cfg, Path(run_dir), progress=False)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        packing = json.loads((Path(run_dir) / "packing.json").read_text())
    rows = [r for r in rows if "loss" in r]
    previous = [{"elapsed_s": 0.0, "tokens": 0}] + rows[:-1]
    per_step = [(r["elapsed_s"] - p["elapsed_s"], r["tokens"] - p["tokens"])
                for r, p in zip(rows, previous, strict=True)]
    timed = per_step[1:]  # the first step warms up
    per_row = packing["examples"] / packing["rows"] if packing["enabled"] else 1.0
    return {"side": side, "s_per_step": statistics.median(s for s, _ in timed),
            "tokens_per_s": sum(n for _, n in timed) / sum(s for s, _ in timed),
            "tokens_per_step": statistics.median(n for _, n in timed),
            "examples_per_step": per_row * cfg.train.batch_size * cfg.train.grad_accum,
            "padding_fraction": statistics.mean(r["padding_fraction"] for r in rows),
            "peak_rss_mb": rows[-1]["peak_rss_mb"], "losses": [r["loss"] for r in rows],
            "compute_dtype": str(resolve_dtype(cfg.train.compute_dtype)), "packing": packing}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--child", choices=("data", "run"))
    p.add_argument("--side", choices=SIDES)
    args = p.parse_args()
    if args.child == "data":
        print(json.dumps(child_data()))
        return
    if args.child == "run":
        print(json.dumps(child_run(args.side, args.steps, args.threads)))
        return
    env = {"OMP_NUM_THREADS": str(args.threads)}
    print(cpu_header(vector_flags()))
    data = run_child(__file__, ["--child", "data"], env=env)
    sides = args.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.repeats):
        for side in sides:
            runs[side].append(run_child(__file__, ["--child", "run", "--side", side, "--steps", str(args.steps),
                                                   "--threads", str(args.threads)], env=env))
    keys = ("s_per_step", "tokens_per_s", "tokens_per_step", "examples_per_step", "padding_fraction", "peak_rss_mb")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    print(f"data: {data['examples']} examples -> {data['rows']} rows of {data['row_len']}; padding of epoch 1 at "
          f"batch {data['batch_size']}: unpacked {data['padding_unpacked']:.2%}, packed {data['padding_packed']:.2%}")
    print(f"{'side':<10} {'s/step':>8} {'real tok/s':>11} {'tok/step':>9} {'ex/step':>8} {'padding':>8} "
          f"{'peak MiB':>9}")
    for s, m in med.items():
        print(f"{s:<10} {m['s_per_step']:>8.2f} {m['tokens_per_s']:>11.1f} {m['tokens_per_step']:>9.0f} "
              f"{m['examples_per_step']:>8.2f} {m['padding_fraction']:>8.2%} {m['peak_rss_mb']:>9.0f}")
    write_result(args.output, {"date": datetime.datetime.now(datetime.UTC).isoformat(), "commit": git_head(),
                               "cpu": cpu_header(vector_flags()), "cores": os.cpu_count(), "args": vars(args) | {
                                   "output": str(args.output)}, "data": data, "medians": med, "runs": runs})


if __name__ == "__main__":
    main()
