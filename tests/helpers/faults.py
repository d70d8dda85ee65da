"""Kill ``qlorakit train`` at chosen moments and resume it: the machinery of ``benchmarks/faults.py`` and of
``tests/train/test_faults.py``.

A *round* trains one tiny run to completion: start it, kill it with SIGKILL at a moment ``plan_kill``
chooses, start it again (``--resume`` when a checkpoint verifies, else afresh with ``--overwrite``, as a
user would), and so on until a start finishes. ``check_round`` then holds the run to an uninterrupted
reference: the same losses bit for bit, every step's metrics row exactly once, every checkpoint on the
disk verified against its manifest, no temporary entry left, the same final adapter bytes.

Moments (``Kill.kind``): ``point`` pauses the child at a named point (``qlorakit.train.faults``: inside a
checkpoint or final-adapter write, or before an optimizer step) and kills it there; ``step`` kills it a
random delay after it printed ``step <k>/`` (anywhere in the next step or in checkpoint ``k``'s write);
``start`` kills it a random delay after it started (imports, loading, verification, stale-entry cleanup).

Children run ``qlorakit train`` as ``python -m qlorakit train`` (``mode="spawn"``) or as
``qlorakit.cli.main.main`` in a fork of this warm process (``mode="fork"``: the same code without the
seconds of imports; the tests use it). Both run with one thread, so every child computes the same floats.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qlorakit.fileio import STALE_RE, WRITE_POINTS
from qlorakit.train import list_checkpoints, read_metrics
from qlorakit.train.checkpoint import newest_verified
from qlorakit.train.faults import ENV as PAUSE_ENV
from qlorakit.train.manifest import verify

#: Every named point of ``qlorakit.train.faults``.
POINTS = ("before-optimizer-step", *WRITE_POINTS)
PAUSED = "qlorakit-fault: paused at"
#: A random kill lands at most this many steps past the newest checkpoint.
MAX_AHEAD = 3
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Setup:
    """A tiny run: model directory, data file, number of steps; ``train_args`` are the flags of a fresh run."""

    model_dir: Path
    data: Path
    steps: int

    def train_args(self, out: Path) -> list[str]:
        return ["train", "--model", str(self.model_dir), "--data", str(self.data), "--output-dir", str(out),
                "--max-steps", str(self.steps), "--save-steps", "1", "--save-total-limit", "2", "--batch-size", "2",
                "--grad-accum", "2", "--lora-r", "4", "--val-size", "2", "--eval-steps", "3", "--compute-dtype",
                "float32", "--no-progress", "--source-max-len", "32", "--target-max-len", "16", "--optim", "adamw",
                "--lr", "1e-2", "--no-gradient-checkpointing"]  # fmt: skip


def make_setup(workdir: Path, tokenizer, shared_dir: Path, steps: int) -> Setup:
    """Save a 1-layer random Llama with ``tokenizer`` and the 14 shortest single-turn OASST1 rows in ``workdir``."""
    from tests.helpers.tiny_llama import save_tiny_llama

    model_dir = save_tiny_llama(workdir / "model", tokenizer, vocab_size=len(tokenizer), hidden_size=32,
                                num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    rows = [json.loads(line) for line in (shared_dir / "data" / "oasst1" / "oasst1_guanaco_val.jsonl").open()]
    single_turn = (r for r in rows if r["input"].count("### Human:") == 1)
    rows = sorted(single_turn, key=lambda r: len(r["input"]) + len(r["output"]))
    data = workdir / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
    return Setup(model_dir, data, steps)


def smol_tokenizer(shared_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_dir / "models" / "smollm2-135m-instruct"), gguf_file=GGUF)


# --- children ------------------------------------------------------------------------------------


class Child:
    """One ``qlorakit`` process writing its stdout and stderr to ``log``."""

    def __init__(self, argv: list[str], log: Path, mode: str, env: dict[str, str]) -> None:
        self.log, self.started, self.popen = log, time.monotonic(), None
        child_env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV} | {"OMP_NUM_THREADS": "1", **env}
        if mode == "spawn":
            with open(log, "wb") as out:
                self.popen = subprocess.Popen([sys.executable, "-m", "qlorakit", *argv], stdout=out,
                                              stderr=subprocess.STDOUT, env={**child_env, "PYTHONUNBUFFERED": "1"})
            self.pid = self.popen.pid
        else:
            self.pid = _fork_main(argv, log, child_env)
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None:
            if self.popen is not None:
                self.code = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                self.code = os.waitstatus_to_exitcode(status) if pid else None
        return self.code

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                self._reap()
                raise TimeoutError(f"qlorakit did not finish within {timeout:.0f} s; "
                                   f"log {self.log}:\n{self.output()[-3000:]}")
            time.sleep(0.01)
        return self.code

    def _reap(self) -> None:
        while self.poll() is None:
            time.sleep(0.005)

    def signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout: float) -> bool:
        """True once ``text`` appears in the log; False when the child exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.poll() is not None:
                return text in self.output()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} did not appear within {timeout:.0f} s; "
                                   f"log {self.log}:\n{self.output()[-3000:]}")
            time.sleep(0.005)
        return True


def _fork_main(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """Fork; the child runs ``qlorakit.cli.main.main(argv)`` with its output in ``log`` and exits with its status."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child's whole life)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch

        torch.set_num_threads(1)
        from qlorakit.cli.main import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (a child reports anything, then exits)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --- one round -----------------------------------------------------------------------------------


@dataclass
class Kill:
    kind: str  # "point" | "step" | "start"
    point: str = ""  # kind "point": the named point, and where ("checkpoint-3", "step-3", "adapter")
    where: str = ""
    step: int = 0  # kind "step": kill after the child printed "step <step>/"
    delay_s: float = 0.0  # kinds "step" and "start": then wait this long

    def label(self) -> str:
        return {"point": f"point {self.point}@{self.where}",
                "step": f"after step {self.step} + {self.delay_s * 1e3:.0f} ms",
                "start": f"start + {self.delay_s * 1e3:.0f} ms"}[self.kind]


@dataclass
class Timing:
    """Seconds from a child's start to its first step line, and per step (from the reference run)."""

    startup_s: float
    step_s: float


@dataclass
class Tally:
    kills: Counter = field(default_factory=Counter)  # by kind
    points: Counter = field(default_factory=Counter)  # kind "point", by named point
    inside_write: int = 0  # kills that left a .<name>.tmp-<pid> / .old-<pid> entry (inside a durable write)
    resumes: int = 0
    fresh_restarts: int = 0  # kills before the first checkpoint: the next start is a fresh run (--overwrite)
    stale_removed: int = 0  # "removed ..." lines: stale entries the next start deleted
    fallbacks: int = 0  # "fails verification" lines (none expected: SIGKILL loses no written data)
    not_reached: int = 0  # kills planned at a moment the child finished before
    rounds: int = 0
    log: list[str] = field(default_factory=list)  # each kill's moment
    seconds: list[float] = field(default_factory=list)  # each killed child's life

    def as_dict(self) -> dict:
        return {"kills": sum(self.kills.values()), "by_kind": dict(self.kills), "by_point": dict(self.points),
                "inside_write": self.inside_write, "resumes": self.resumes, "fresh_restarts": self.fresh_restarts,
                "stale_removed": self.stale_removed, "fallbacks": self.fallbacks, "not_reached": self.not_reached,
                "rounds": self.rounds}


def next_argv(setup: Setup, run_dir: Path) -> tuple[list[str], bool]:
    """The next start's arguments (resume when a checkpoint verifies) and whether it resumes."""
    checkpoint, _ = newest_verified(run_dir) if run_dir.is_dir() else (None, [])
    if checkpoint is not None:
        return ["train", "--resume", str(run_dir), "--no-progress"], True
    return [*setup.train_args(run_dir), "--overwrite"], False


def current_step(run_dir: Path) -> int:
    checkpoint, _ = newest_verified(run_dir) if run_dir.is_dir() else (None, [])
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else 0


def attempt(
    setup: Setup, run_dir: Path, kill: Kill | None, mode: str, log: Path, tally: Tally, timeout: float
) -> int | None:
    """Start once; kill as ``kill`` says. The exit status when the child ended by itself, None when killed."""
    argv, resuming = next_argv(setup, run_dir)
    tally.resumes += resuming
    tally.fresh_restarts += not resuming and run_dir.exists()
    env = {PAUSE_ENV: f"{kill.point}@{kill.where}"} if kill is not None and kill.kind == "point" else {}
    child = Child(argv, log, mode, env)
    try:
        reached = kill is not None and _reach(child, kill, timeout)
        if not reached:
            code = child.wait(timeout)
    finally:  # the planned SIGKILL; also what keeps an interrupted harness from leaving a child behind
        if child.poll() is None:
            child.signal(signal.SIGKILL)
            child._reap()
    if not reached:
        _count_output(child.output(), tally)
        tally.not_reached += kill is not None
        return code
    tally.seconds.append(round(time.monotonic() - child.started, 2))
    tally.kills[kill.kind] += 1
    if kill.kind == "point":
        tally.points[kill.point] += 1
    tally.inside_write += any(STALE_RE.match(p.name) for p in run_dir.iterdir()) if run_dir.is_dir() else 0
    _count_output(child.output(), tally)
    tally.log.append(kill.label())
    return None


def _reach(child: Child, kill: Kill, timeout: float) -> bool:
    """Wait for the moment of ``kill``; False when the child exited before it."""
    if kill.kind == "point":
        return child.wait_for(PAUSED, timeout)
    if kill.kind == "step" and not child.wait_for(f"step {kill.step}/", timeout):
        return False
    time.sleep(kill.delay_s)
    return child.poll() is None


def _count_output(text: str, tally: Tally) -> None:
    tally.stale_removed += text.count("(left by a process that no longer runs)")
    tally.fallbacks += text.count("fails verification")


def plan_kill(rng: random.Random, pending: list[str], done: int, total: int, timing: Timing) -> Kill | None:
    """The next kill of a run whose newest checkpoint is step ``done`` of ``total``, or None (let it finish).

    First the named points in ``pending`` that can still be reached (each removed once used), then random
    moments: 15% a delay after the start, 40% a delay after a step line, 45% a named point; the step or
    checkpoint is at most ``MAX_AHEAD`` past ``done``, so that a run is killed often before it ends. Once
    every checkpoint is written, one kill in three lands in the final adapter's write and the rest let the
    run finish.
    """
    reachable = [p for p in pending if done < total or p in WRITE_POINTS]
    if reachable:
        point, r = reachable[0], 1.0
        pending.remove(point)
    elif done == total:
        point, r = rng.choice(WRITE_POINTS), (1.0 if rng.random() < 1 / 3 else None)
        if r is None:
            return None
    else:
        point, r = rng.choice(POINTS), rng.random()
    k = rng.randint(done + 1, min(total, done + MAX_AHEAD)) if done < total else total
    if r < 0.15:
        return Kill("start", delay_s=rng.uniform(0.0, timing.startup_s + timing.step_s))
    if r < 0.55 and done < total:
        return Kill("step", step=k, delay_s=rng.uniform(0.0, 2.0 * timing.step_s))
    if point == "before-optimizer-step":
        return Kill("point", point, f"step-{k}")
    return Kill("point", point, "adapter" if done == total else f"checkpoint-{k}")


def run_round(setup: Setup, run_dir: Path, kills: int, mode: str, rng: random.Random, timing: Timing, tally: Tally,
              timeout: float, pending: list[str]) -> int:
    """Train ``run_dir`` to the end, killing it up to ``kills`` times (first at each named point in ``pending``);
    return the kills made."""
    made, starts = 0, 0
    while True:
        kill = plan_kill(rng, pending, current_step(run_dir), setup.steps, timing) if made < kills else None
        log = run_dir.parent / f"{run_dir.name}-start{starts}.log"
        starts += 1
        code = attempt(setup, run_dir, kill, mode, log, tally, timeout)
        if code is None:
            made += 1
        elif code != 0:
            raise RuntimeError(f"qlorakit train exited with {code} (not killed); log {log}:\n{log.read_text()[-3000:]}")
        else:
            tally.rounds += 1
            return made


def warm_imports(model_dir: Path) -> None:
    """Import here what a ``qlorakit train`` child imports, so that forks of this process skip those seconds."""
    import datasets  # noqa: F401  (the JSON reader's)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import qlorakit.cli.main
    import qlorakit.data
    import qlorakit.eval.during_training
    import qlorakit.models  # noqa: F401

    AutoTokenizer.from_pretrained(str(model_dir))


def reference_run(setup: Setup, run_dir: Path, mode: str, timeout: float) -> Timing:
    """The uninterrupted run, and its timing (first step line, seconds per step) for planning kills."""
    if mode == "fork":
        warm_imports(setup.model_dir)
    child = Child(setup.train_args(run_dir), run_dir.parent / f"{run_dir.name}.log", mode, {})
    first = None
    while child.poll() is None and first is None:
        first = time.monotonic() - child.started if "step 1/" in child.output() else None
        time.sleep(0.005)
    code = child.wait(timeout)
    if code != 0:
        raise RuntimeError(f"the reference run failed ({code}):\n{child.output()[-3000:]}")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    step_s = max(rows[-1]["elapsed_s"] / len(rows), 1e-3)
    return Timing(startup_s=first if first is not None else 1.0, step_s=step_s)


def check_round(run_dir: Path, reference: Path, steps: int) -> list[str]:
    """Every way ``run_dir`` differs from an uninterrupted run (``reference``); [] = none."""
    problems = []
    rows, ref_rows = read_metrics(run_dir / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    if train_steps != list(range(1, steps + 1)):
        problems.append(f"training rows of steps {train_steps}, expected each of 1..{steps} once")
    def losses(rs, key):
        return [(r["step"], r[key]) for r in rs if key in r]
    for key in ("loss", "eval_loss"):
        if losses(rows, key) != losses(ref_rows, key):
            problems.append(f"{key} differs from the uninterrupted run: {losses(rows, key)} vs {losses(ref_rows, key)}")
    for checkpoint in list_checkpoints(run_dir):
        problems += [f"{checkpoint.name}: {line}" for line in verify(checkpoint)]
    left = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if STALE_RE.match(p.name) or ".tmp" in p.name]
    if left:
        problems.append(f"temporary entries left: {left}")
    adapter = "adapter/adapter_model.safetensors"
    if (run_dir / adapter).read_bytes() != (reference / adapter).read_bytes():
        problems.append(f"{adapter} differs from the uninterrupted run's")
    return problems
