"""AdamW step time and peak memory: qlorakit 32/8-bit, paged or not, next to torch and bitsandbytes (CPU).

    python benchmarks/optim_paging.py [--layers 10] [--rank 64] [--repeats 5] [--threads 1] [--output JSON]

The parameters are LoRA factors of a Llama-7B-shaped decoder (hidden 4096, MLP 11008): per layer and per
projection q, k, v, o, gate, up, down an ``A: (r, in)`` and a ``B: (out, r)``; 10 layers at r = 64 are
50.1M parameters in 140 tensors. Every optimizer runs in a fresh subprocess on the same seeded parameters
and gradients: one warm-up step, then ``--repeats`` timed steps (median reported), and the peak RSS of
the process (``ru_maxrss``) minus the peak before the optimizer was built (parameters, gradients and
imports), i.e. what the optimizer adds at its peak, state and temporaries included.

Paged variants get a budget of ``--budget-fraction`` (25%) of their paged state; their state lives in a
memory-mapped temporary file (``--page-dir``, default the system temp dir: put it on a disk, not tmpfs).
bitsandbytes' ``PagedAdamW``/``PagedAdamW8bit`` fall back to unpaged state on CPU (bitsandbytes warns);
they are run anyway to show it. Default ``--threads 1``: the shared 2-core machine is loaded by other
jobs, and with 2 threads every OpenMP-parallel op can wait ~10 ms for a descheduled thread.

Prints one table and writes ``benchmarks/results/optim_paging.json`` atomically. About 2-4 minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from _harness import run_child, write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks/results/optim_paging.json"
HIDDEN, INTERMEDIATE = 4096, 11008
PROJECTIONS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN),
               "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}
HYPER = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
VARIANTS = ("torch_adamw", "adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit",
            "bnb_adamw8bit", "bnb_paged_adamw", "bnb_paged_adamw8bit")
PEER = "torch_adamw"


def lora_shapes(layers: int, rank: int) -> list[tuple[int, int]]:
    """``A: (r, in)`` and ``B: (out, r)`` for every projection of every layer."""
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in PROJECTIONS.values():
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def state_bytes(variant: str, shapes: list[tuple[int, int]]) -> int:
    """Bytes of optimizer state: 8 per parameter, or 2 + 8/256 for tensors of >= 4096 elements in 8-bit."""
    total = 0
    for rows, cols in shapes:
        n = rows * cols
        total += 2 * n + 8 * (-(-n // 256)) if "8bit" in variant and n >= 4096 else 8 * n
    return total


def build_optimizer(variant: str, params: list[torch.Tensor], budget: int, page_dir: str | None):
    if variant == "torch_adamw":
        return torch.optim.AdamW(params, **HYPER)
    if variant.startswith("bnb_"):
        import bitsandbytes as bnb

        cls = {"bnb_adamw8bit": bnb.optim.AdamW8bit, "bnb_paged_adamw": bnb.optim.PagedAdamW,
               "bnb_paged_adamw8bit": bnb.optim.PagedAdamW8bit}[variant]
        return cls(params, **HYPER)
    from qlorakit.optim import AdamW

    paged = variant.startswith("paged_")
    return AdamW(params, optim_bits=8 if variant.endswith("8bit") else 32, paged=paged,
                 page_budget_bytes=budget if paged else None, page_dir=page_dir, **HYPER)


def random_params(shapes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """Parameters ~ N(0, 1) with gradients ~ N(0, 1e-6), filled in place (no temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.empty(s).normal_(generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.empty(p.shape).normal_(std=1e-3, generator=gen)
    return params


def warm_up(variant: str, page_dir: str | None) -> None:
    """Two steps of the same optimizer on 1M parameters, so that code pages and lazily built tables
    (torch kernels, the 8-bit lookup tables) are resident before the baseline is taken."""
    params = random_params(lora_shapes(1, 64)[:4], seed=1)
    opt = build_optimizer(variant, params, budget=1 << 30, page_dir=page_dir)
    opt.step()
    opt.step()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this (fresh) process and return its measurements."""
    torch.set_num_threads(args.threads)
    if args.variant.startswith("bnb_"):
        import bitsandbytes  # noqa: F401  (imported before the baseline, like qlorakit)
    import qlorakit.optim  # noqa: F401

    shapes = lora_shapes(args.layers, args.rank)
    warm_up(args.variant, args.page_dir)
    params = random_params(shapes, seed=0)
    budget = int(args.budget_fraction * state_bytes(args.variant, shapes))
    baseline = rss_peak_mb()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = build_optimizer(args.variant, params, budget, args.page_dir)
        opt.step()  # warm-up: allocates the state
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    store = getattr(opt, "store", None)
    return {
        "variant": args.variant,
        "median_s": statistics.median(times),
        "times_s": times,
        "rss_before_optimizer_mb": baseline,
        "rss_peak_mb": rss_peak_mb(),
        "optimizer_rss_mb": rss_peak_mb() - baseline,
        "state_mb": state_bytes(args.variant, shapes) / 2**20,
        "budget_mb": budget / 2**20 if store is not None else None,
        "paged_peak_resident_mb": store.peak_resident_bytes / 2**20 if store is not None else None,
        "page_ins": store.page_ins if store is not None else None,
        "warnings": sorted({str(w.message) for w in caught}),
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--worker", variant, "--layers", str(args.layers), "--rank", str(args.rank), "--repeats",
             str(args.repeats), "--threads", str(args.threads), "--budget-fraction", str(args.budget_fraction)]
    if args.page_dir:
        flags += ["--page-dir", args.page_dir]
    return run_child(__file__, flags, env={"TORCH_COMPILE_DISABLE": "1"})


def format_table(results: list[dict[str, Any]]) -> str:
    peer = next(r for r in results if r["variant"] == PEER)
    lines = [(f"{'optimizer':<22}{'step s':>9}{'vs torch':>10}{'state MB':>10}{'budget MB':>11}"
             f"{'paged peak MB':>15}{'opt. RSS MB':>13}{'peak RSS MB':>13}")]
    for r in results:
        budget = f"{r['budget_mb']:.0f}" if r["budget_mb"] is not None else "-"
        resident = f"{r['paged_peak_resident_mb']:.1f}" if r["paged_peak_resident_mb"] is not None else "-"
        lines.append(f"{r['variant']:<22}{r['median_s']:>9.3f}{r['median_s'] / peer['median_s']:>9.2f}x"
                     f"{r['state_mb']:>10.0f}{budget:>11}{resident:>15}{r['optimizer_rss_mb']:>13.0f}"
                     f"{r['rss_peak_mb']:>13.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=10, help="decoder layers of LoRA factors (default 10)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="paged budget / paged state")
    parser.add_argument("--page-dir", default=None, help="directory of the paged state files")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the default")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    if PEER not in variants:
        variants.insert(0, PEER)
    start = time.perf_counter()
    results = [run_variant(v, args) for v in variants]
    peer_s = next(r["median_s"] for r in results if r["variant"] == PEER)
    shapes = lora_shapes(args.layers, args.rank)
    report = {
        "benchmark": "optim_paging",
        "config": {"layers": args.layers, "rank": args.rank, "tensors": len(shapes),
                   "parameters": sum(r * c for r, c in shapes), "repeats": args.repeats, "threads": args.threads,
                   "budget_fraction": args.budget_fraction, "hyperparameters": HYPER, "device": "cpu",
                   "torch": torch.__version__, "bitsandbytes": _bnb_version()},
        "peer": PEER,
        "results": [{**r, "ratio_to_peer": r["median_s"] / peer_s} for r in results],
        "seconds_total": time.perf_counter() - start,
    }
    print(format_table(results))
    print(f"\n{report['config']['parameters'] / 1e6:.1f}M parameters in {len(shapes)} tensors; "
          f"median of {args.repeats} steps; {args.threads} thread(s); total {report['seconds_total']:.0f}s")
    write_result(args.output, report)
    return 0


def _bnb_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
