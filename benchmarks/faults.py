"""Kill ``qlorakit train`` with SIGKILL at N moments, resume it each time, and compare with an uninterrupted run.

    python benchmarks/faults.py [--kills 50] [--steps 12] [--mode spawn|fork] [--seed 0] [--output JSON]

The run is tiny (a 1-layer random Llama with the SmolLM2 tokenizer, 12 OASST1 rows, ``--steps`` steps of
2 x 2 micro-batches, a checkpoint every step, 2 kept, a held-out loss every 3 steps). Each *round* trains
one run directory to the end while killing it: the first kills of the first round land at each named
point of ``qlorakit.train.faults`` once (before an optimizer step; inside a checkpoint write after its
files, after their fsync, after the rename), all others at random moments (``tests.helpers.faults.plan_kill``:
a named point at a random step, a random delay after a step line, a random delay after the start). After each
kill the harness starts
``qlorakit train --resume RUN`` (or a fresh run with ``--overwrite`` when no checkpoint verifies yet),
until a start finishes; then a new round, until ``--kills`` kills were made. ``tests.helpers.faults``
holds the machinery (the short version of this runs in ``tests/train/test_faults.py``).

Checked for every round against the uninterrupted run: every step's loss and every held-out loss equal bit
for bit; metrics.jsonl has each step's row once; every checkpoint on the disk verifies against its
manifest; no temporary entry (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``) is left; the final adapter file
is byte-identical. ``--mode spawn`` (default) starts every child as ``python -m qlorakit train``; ``fork``
runs ``qlorakit.cli.main.main`` in a fork of this warm process (the same code, without the imports).

Prints one table and writes ``benchmarks/results/faults.json`` atomically; exits 1 when a check failed.
About 10-20 s per kill with ``spawn`` on a loaded 2-core machine (imports), 1-2 s with ``fork``.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers

from qlorakit.train import list_checkpoints
from tests.helpers.faults import (
    POINTS,
    Tally,
    check_round,
    make_setup,
    reference_run,
    run_round,
    smol_tokenizer,
)

from _harness import git_head, write_result

DEFAULT_OUTPUT = REPO / "benchmarks/results/faults.json"
SHARED = REPO.parent / "shared"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--kills", type=int, default=50, help="SIGKILLs to make in all (default 50)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of one run (default 12)")
    p.add_argument("--mode", choices=("spawn", "fork"), default="spawn", help="how children start (default spawn)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one child may run")
    p.add_argument("--workdir", help="keep the runs and logs here (default: a temporary directory, deleted)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    return p.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict:
    setup = make_setup(work, smol_tokenizer(SHARED), SHARED, args.steps)
    reference = work / "reference"
    timing = reference_run(setup, reference, args.mode, args.timeout)
    print(f"reference: {args.steps} steps, {timing.startup_s:.1f} s to the first step, {timing.step_s * 1e3:.0f} ms "
          f"per step ({args.mode})", flush=True)
    tally, rng, made, problems, checkpoints = Tally(), random.Random(args.seed), 0, {}, 0
    while made < args.kills and tally.rounds <= 2 * args.kills:
        run_dir = work / f"round{tally.rounds}"
        pending = list(POINTS) if tally.rounds == 0 else []  # the first round visits every named point once
        kills = run_round(setup, run_dir, args.kills - made, args.mode, rng, timing, tally, args.timeout, pending)
        made += kills
        found = check_round(run_dir, reference, args.steps)
        checkpoints += len(list_checkpoints(run_dir))
        if found:
            problems[run_dir.name] = found
        print(f"{run_dir.name}: {kills} kills, {'OK' if not found else 'FAILED: ' + '; '.join(found)}", flush=True)
    return {"tally": tally, "problems": problems, "checkpoints_verified": checkpoints, "timing": timing}


def report(args: argparse.Namespace, out: dict, seconds: float) -> dict:
    tally: Tally = out["tally"]
    counts = tally.as_dict()
    rows = [("kills (SIGKILL)", counts["kills"]), *((f"  at {k}", v) for k, v in sorted(counts["by_kind"].items())),
            *((f"    point {k}", v) for k, v in sorted(counts["by_point"].items())),
            ("  inside a durable write (temp entry left)", counts["inside_write"]),
            ("starts with --resume", counts["resumes"]),
            ("fresh restarts (no checkpoint yet)", counts["fresh_restarts"]),
            ("stale temp entries removed at start", counts["stale_removed"]),
            ("checkpoints failing verification at resume", counts["fallbacks"]),
            ("planned kills not reached (child finished)", counts["not_reached"]),
            ("rounds (runs trained to the end)", counts["rounds"]),
            ("rounds equal to the uninterrupted run", counts["rounds"] - len(out["problems"])),
            ("checkpoints on disk at the ends, all verified",
             out["checkpoints_verified"] if not out["problems"] else "-")]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'fault harness (' + args.mode + ')':<{width}}  count")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"{'wall time':<{width}}  {seconds:.0f} s")
    return {"commit": git_head(), "mode": args.mode, "steps": args.steps, "seed": args.seed,
            "seconds": round(seconds, 1),
            "startup_s": round(out["timing"].startup_s, 2), "step_s": round(out["timing"].step_s, 4), **counts,
            "checkpoints_verified": out["checkpoints_verified"], "problems": out["problems"], "kill_moments": tally.log}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up children and workdir
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        out = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="qlorakit-faults-") as work:
            out = run(args, Path(work))
    write_result(args.output, report(args, out, time.monotonic() - started))
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
