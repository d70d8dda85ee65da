"""Fuzz every file reader with many hostile inputs: the generators of tests/fuzz, at benchmark scale.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_readers.py [--count 10000] [--targets gguf,adapter] [--limit-s 10]

For each reader of ``tests/fuzz/fuzz_targets.py`` (data JSON/JSONL/CSV/Parquet/text, GGUF header,
safetensors header and index, PEFT adapter directory, MMLU CSV, pairwise and relative judgements),
``--count`` inputs are generated from ``random.Random(seed + i)`` (input ``i`` of a reader is
reproducible alone) and read in a worker process, one at a time, under a per-input time limit and
tracemalloc. A worker that dies (a segfault in a C extension) or stops answering is counted and
replaced, so one bad input costs one row of the table, not the run.

Columns: inputs; ok (read without error); refused (a QlorakitError naming the file and a position);
other (any other exception, or a qlorakit error without file or position: must be 0); hangs (over
``--limit-s``); crashes (the worker died); slowest input; the largest tracemalloc peak of one input
(Python and numpy allocations; pyarrow's own memory pool is reported separately as its high-water
mark over the whole run of the data readers). Writes ``benchmarks/results/fuzz_readers.json``; no
number is asserted. The first few messages of each non-refusal are kept in the JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qlorakit.fileio import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
FUZZ_DIR = REPO / "tests" / "fuzz"
OUTPUT = REPO / "benchmarks" / "results" / "fuzz_readers.json"
EXAMPLES_KEPT = 5


def _worker(name: str, seed: int, limit_s: float, conn: Any) -> None:
    """Read inputs ``i`` sent by the parent; answer ``(kind, message, seconds, peak, input bytes)``."""
    sys.path.insert(0, str(FUZZ_DIR))
    import random

    from fuzz_runner import read_one, warm_up
    from fuzz_targets import TARGETS

    target = TARGETS[name]
    warm_up(target)  # imports and caches before the first measured input, without a time limit
    conn.send("ready")
    while True:
        index = conn.recv()
        if index is None:
            conn.send(_arrow_peak())
            return
        files = target.generate(random.Random(seed + index))
        outcome = read_one(target, files, limit_s, trace_memory=True)
        conn.send((outcome.kind, outcome.message, outcome.seconds, outcome.peak_bytes,
                   sum(len(d) for d in files.values())))


def _arrow_peak() -> int:
    """High-water mark of pyarrow's default memory pool in this process (0 if pyarrow was not used)."""
    if "pyarrow" not in sys.modules:
        return 0
    import pyarrow

    return int(pyarrow.default_memory_pool().max_memory() or 0)


class Worker:
    """A reader's worker process; restarted after a crash or a hang."""

    def __init__(self, name: str, seed: int, limit_s: float) -> None:
        self.name, self.seed, self.limit_s = name, seed, limit_s
        self.context = multiprocessing.get_context("spawn")
        self.process, self.conn = None, None
        self.arrow_peak = 0
        self.start()

    def start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(self.name, self.seed, self.limit_s, child),
                                            daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError(f"the {self.name} worker did not start")

    def read(self, index: int) -> tuple[str, str, float, int, int]:
        """One input's outcome; after a hang or a crash the worker is replaced (a timer that fired inside
        an import leaves modules half-initialized)."""
        self.conn.send(index)
        try:
            if self.conn.poll(2 * self.limit_s + 5):
                answer = self.conn.recv()
                if answer[0] == "hang":
                    self.restart()
                return answer
            kind, message = "hang", f"no answer after {2 * self.limit_s + 5:.0f} s (worker killed)"
        except EOFError:
            self.process.join(5)
            kind, message = "crash", f"worker died with exit code {self.process.exitcode}"
        self.restart(answering=False)
        return kind, message, float("nan"), 0, 0

    def restart(self, answering: bool = True) -> None:
        self.arrow_peak = max(self.arrow_peak, self._stop(answering))
        self.start()

    def _stop(self, answering: bool = True) -> int:
        """Stop the worker; its pyarrow high-water mark if it is ``answering``, else 0."""
        peak = 0
        if answering:
            self.conn.send(None)
            peak = self.conn.recv() if self.conn.poll(30) else 0
        self.process.kill()
        self.process.join()
        return peak

    def close(self) -> None:
        self.arrow_peak = max(self.arrow_peak, self._stop())


def fuzz_target(name: str, count: int, seed: int, limit_s: float) -> dict[str, Any]:
    """Read ``count`` inputs of one reader; the counts, extremes and example messages."""
    started = time.perf_counter()
    worker = Worker(name, seed, limit_s)
    counts = dict.fromkeys(("ok", "refused", "bad", "hang", "crash"), 0)
    examples: dict[str, list[dict[str, Any]]] = {k: [] for k in ("bad", "hang", "crash")}
    slowest, peak, peak_index, biggest = 0.0, 0, -1, 0
    for index in range(count):
        kind, message, seconds, peak_bytes, size = worker.read(index)
        counts[kind] += 1
        if kind in examples and len(examples[kind]) < EXAMPLES_KEPT:
            examples[kind].append({"input": index, "message": message[:500]})
        if seconds == seconds:  # not NaN
            slowest = max(slowest, seconds)
        if peak_bytes > peak:
            peak, peak_index = peak_bytes, index
        biggest = max(biggest, size)
    worker.close()
    wall = time.perf_counter() - started
    return {"inputs": count, "ok": counts["ok"], "qlorakit_errors": counts["refused"],
            "other_exceptions": counts["bad"], "hangs": counts["hang"], "crashes": counts["crash"],
            "slowest_input_s": round(slowest, 4),
            "largest_tracemalloc_peak_bytes": peak, "largest_peak_input": peak_index,
            "largest_input_bytes": biggest, "arrow_pool_peak_bytes": worker.arrow_peak,
            "wall_s": round(wall, 1), "ms_per_input": round(1000 * wall / count, 2), "examples": examples}


def _format_table(results: dict[str, dict[str, Any]]) -> str:
    head = (f"{'reader':<20} {'inputs':>7} {'ok':>6} {'refused':>7} {'other':>5} {'hangs':>5} {'crash':>5} "
            f"{'slowest s':>9} {'peak KiB':>9} {'arrow KiB':>9} {'ms/input':>8}")
    lines = [head]
    for name, r in results.items():
        lines.append(f"{name:<20} {r['inputs']:>7} {r['ok']:>6} {r['qlorakit_errors']:>7} {r['other_exceptions']:>5} "
                     f"{r['hangs']:>5} {r['crashes']:>5} {r['slowest_input_s']:>9.3f} "
                     f"{r['largest_tracemalloc_peak_bytes'] / 1024:>9.0f} {r['arrow_pool_peak_bytes'] / 1024:>9.0f} "
                     f"{r['ms_per_input']:>8.1f}")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version()}
    for package in ("pyarrow", "datasets", "safetensors", "gguf", "transformers", "hypothesis"):
        found[package] = version(package)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    found["commit"] = commit.stdout.strip()
    return found


def main() -> None:
    sys.path.insert(0, str(FUZZ_DIR))
    from fuzz_targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="inputs per reader (default 10,000)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated readers (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="input i of a reader is random.Random(seed + i)")
    parser.add_argument("--limit-s", type=float, default=10.0, help="seconds one input may take (default 10)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    names = args.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown readers {unknown}; choose from {list(TARGETS)}")
    print(f"{args.count} inputs per reader, seed {args.seed}, limit {args.limit_s} s per input, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    results = {}
    for name in names:
        results[name] = fuzz_target(name, args.count, args.seed, args.limit_s)
        print(f"  {name}: {results[name]['wall_s']} s", flush=True)
    print(_format_table(results))
    totals = {key: sum(r[key] for r in results.values())
              for key in ("inputs", "qlorakit_errors", "other_exceptions", "hangs", "crashes")}
    write_json_atomic(args.output, {"count": args.count, "seed": args.seed, "limit_s": args.limit_s,
                                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "versions": _versions(),
                                    "totals": totals, "readers": results})
    print(f"totals: {totals}\nwrote {args.output}")


if __name__ == "__main__":
    main()
