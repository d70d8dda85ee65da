"""glibc heap and page faults around each phase of ``qlorakit train`` steps (the heap probe of docs/memory.md).

    OMP_NUM_THREADS=1 python benchmarks/step_heap.py [--steps 3] [--workdir DIR] [-- <extra qlorakit train flags>]

Runs ``qlorakit train`` in this process on the model and data ``benchmarks/train_throughput.py`` prepared in
``--workdir`` (SmolLM2-135M as fp32 safetensors, its OASST1 sample; seq 512 x batch 2, r 16, fp32: its defaults
otherwise, or the extra flags, e.g. ``--malloc-trim-blocks``) and prints one table: for each step, the minor
page faults, system and user CPU seconds, and at the end of its forward the RSS, glibc's heap (``mallinfo2``:
``arena``, in use, free) and the resident high-water mark. Writes ``--output`` (JSON) when given. Linux + glibc
only; never asserts a time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import tempfile
from pathlib import Path

from _harness import train_on_prepared

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-train-throughput"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def _snapshot(libc) -> dict:
    info, usage = libc.mallinfo2(), resource.getrusage(resource.RUSAGE_SELF)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mib = 2.0**20
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
            "heap_mib": info.arena / mib, "heap_used_mib": info.uordblks / mib, "heap_free_mib": info.fordblks / mib,
            "minflt": usage.ru_minflt, "sys_s": usage.ru_stime, "user_s": usage.ru_utime}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="train_throughput.py's prepared workdir")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="flags passed on to qlorakit train (after --)")
    args = p.parse_args(argv)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    import torch

    from qlorakit.train import loop

    marks: list[tuple[str, dict]] = []
    forward, one_step = loop.token_loss_sum, loop.step

    def timed_forward(*a, **k):
        out = forward(*a, **k)
        marks.append(("forward", _snapshot(libc)))
        return out

    def timed_step(run, bar):
        marks.append(("start", _snapshot(libc)))
        one_step(run, bar)
        marks.append(("end", _snapshot(libc)))

    loop.token_loss_sum, loop.step = timed_forward, timed_step
    status = train_on_prepared(args.workdir, args.steps, ["--warmup-ratio", "0", "--compute-dtype", "float32",
                                                          *args.extra])
    if status != 0:
        return status
    rows = []
    starts = [m for k, m in marks if k == "start"]
    ends = [m for k, m in marks if k == "end"]
    forwards = [m for k, m in marks if k == "forward"]
    for i, (a, b, f) in enumerate(zip(starts, ends, forwards, strict=False)):
        rows.append({"step": i + 1, "minor_faults": b["minflt"] - a["minflt"], "sys_s": b["sys_s"] - a["sys_s"],
                     "user_s": b["user_s"] - a["user_s"], "forward_end": f, "hwm_mib": b["hwm_mib"]})  # fmt: skip
    heads = ("step", "faults", "sys s", "user s", "rss", "heap", "used", "free", "hwm")
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (4, 9, 6, 7, 6, 6, 6, 6, 6), strict=True)))
    for r in rows:
        f = r["forward_end"]
        print(f"{r['step']:>4} {r['minor_faults']:>9,} {r['sys_s']:>6.2f} {r['user_s']:>7.2f} {f['rss_mib']:>6.0f} "
              f"{f['heap_mib']:>6.0f} {f['heap_used_mib']:>6.0f} {f['heap_free_mib']:>6.0f} {r['hwm_mib']:>6.0f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flags = " ".join(args.extra) or "(defaults)"
    print(f"peak RSS (ru_maxrss) {peak:,.0f} MiB; torch {torch.__version__}; flags {flags}")
    from qlorakit.train import arena

    counters = arena.stats()
    if counters is not None:
        mib = 2**20
        print(f"arena: peak live {counters.peak_live / mib:,.0f} MiB, peak mapped {counters.peak_mapped / mib:,.0f} "
              f"MiB, {counters.reused:,} requests reused, {counters.segments_mapped:,} segments mapped")
    if args.output:
        args.output.write_text(json.dumps({"flags": args.extra, "steps": rows, "peak_rss_mib": peak,
                                           "arena": counters.__dict__ if counters else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
