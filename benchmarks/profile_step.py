"""Where a ``qlorakit train`` step spends its CPU time: torch.profiler over one step, by op (issue 14's bf16 profile).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py [--step 3] [--top 15] [-- <extra qlorakit train flags>]

Runs ``qlorakit train`` in this process on the model and data ``benchmarks/train_throughput.py`` prepared
(SmolLM2-135M as fp32 safetensors, its OASST1 sample; seq 512 x batch 2, r 16, batch 2 x 1, bf16 unless the extra
flags say otherwise; the budget chooser's defaults otherwise) and profiles optimizer step ``--step`` (the steps
before it warm the caches). Prints the ops with the most self CPU time, with their share of the step, and the
step's wall time. Never asserts a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _harness import train_on_prepared

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-train-throughput"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", type=int, default=3, help="the optimizer step to profile (1-based)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="train_throughput.py's prepared workdir")
    p.add_argument("extra", nargs="*", help="flags passed on to qlorakit train (after --)")
    args = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qlorakit.train import loop

    one_step, seen, result = loop.step, [0], {}

    def profiled_step(run, bar):
        seen[0] += 1
        if seen[0] != args.step:
            return one_step(run, bar)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            out = one_step(run, bar)
            result["wall_s"] = time.perf_counter() - start
        result["table"] = prof.key_averages()
        return out

    loop.step = profiled_step
    status = train_on_prepared(args.workdir, args.step, ["--grad-accum", "1", "--compute-dtype", "bfloat16",
                                                         *args.extra])
    if status != 0 or "table" not in result:
        return status or 1
    events = sorted(result["table"], key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print(f"step {args.step}: {result['wall_s']:.2f} s wall; self CPU time by op (torch {torch.__version__}):")
    print(f"{'op':<48}{'calls':>8}{'self s':>9}{'share':>8}")
    for e in events[: args.top]:
        print(f"{e.key[:47]:<48}{e.count:>8}{e.self_cpu_time_total / 1e6:>9.3f}{e.self_cpu_time_total / total:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
