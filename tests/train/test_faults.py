"""Kills, power loss and stop signals: ``qlorakit train`` resumes to the uninterrupted losses, bit for bit.

The short version of ``benchmarks/faults.py`` (``tests.helpers.faults``): children are forks of this
process running ``qlorakit.cli.main.main``, with one thread each, on a 1-layer tiny Llama for 5 steps.
"""

from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path

import pytest

from qlorakit.fileio import STALE_RE
from qlorakit.train import list_checkpoints
from qlorakit.train.checkpoint import newest_verified
from qlorakit.train.faults import ENV as PAUSE_ENV
from tests.helpers.faults import (
    PAUSED,
    POINTS,
    Child,
    Tally,
    check_round,
    make_setup,
    reference_run,
    run_round,
)

STEPS = 5
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def faults_setup(tmp_path_factory, smol_tokenizer, shared_dir):
    """The tiny run, its uninterrupted reference directory and its timing."""
    work = tmp_path_factory.mktemp("faults")
    setup = make_setup(work, smol_tokenizer, shared_dir, steps=STEPS)
    timing = reference_run(setup, work / "reference", "fork", TIMEOUT)
    return setup, work / "reference", timing


def _resume(run_dir: Path, log: Path) -> Child:
    child = Child(["train", "--resume", str(run_dir), "--no-progress"], log, "fork", {})
    assert child.wait(TIMEOUT) == 0, child.output()[-3000:]
    return child


def _temporaries(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob("*") if STALE_RE.match(p.name)]


def test_sigkill_at_each_named_point_and_at_random_moments_resumes_to_the_same_run(faults_setup, tmp_path):
    setup, reference, timing = faults_setup
    tally = Tally()
    kills = run_round(setup, tmp_path / "run", len(POINTS) + 2, "fork", random.Random(16), timing, tally, TIMEOUT,
                      pending=list(POINTS))
    assert kills >= len(POINTS), tally.log  # the random ones may let the run finish early
    assert set(tally.points) >= set(POINTS), tally.log  # one kill inside each named point at least
    assert tally.inside_write >= 2 and tally.fallbacks == 0, tally.as_dict()  # SIGKILL loses no written file
    assert check_round(tmp_path / "run", reference, STEPS) == []


@pytest.mark.parametrize("damage", ["truncate-adapter", "zero-optimizer", "zero-manifest"])
def test_power_loss_in_the_newest_checkpoint_is_detected_and_resume_uses_the_previous(faults_setup, tmp_path, damage):
    """A lost page cache leaves a renamed checkpoint with short or zeroed files; --resume must not trust it."""
    _, reference, _ = faults_setup
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / f"checkpoint-{STEPS}"
    file = {"truncate-adapter": "adapter/adapter_model.safetensors", "zero-optimizer": "optimizer.safetensors",
            "zero-manifest": "manifest.json"}[damage]
    size = (newest / file).stat().st_size
    (newest / file).write_bytes(b"" if damage.startswith("truncate") else bytes(size))
    child = _resume(run, tmp_path / "resume.log")
    out = child.output()
    assert f"checkpoint-{STEPS} fails verification: {file}" in out
    if damage == "truncate-adapter":
        assert f"expected {size:,} bytes, found 0" in out
    assert f"resuming from checkpoint-{STEPS - 1}, the newest checkpoint that verifies" in out
    assert check_round(run, reference, STEPS) == []  # step 5 trained again, to the same loss


@pytest.mark.parametrize(("signals", "point", "newest", "code"), [
    ((signal.SIGTERM,), "before-optimizer-step@step-3", 3, 143),  # during a step: it finishes, then saves
    ((signal.SIGTERM,), "after-fsync-before-rename@checkpoint-2", 2, 143),  # during a save: it completes
    ((signal.SIGINT,), "after-files-before-fsync@checkpoint-2", 2, 130),
    ((signal.SIGINT, signal.SIGINT), "after-files-before-fsync@checkpoint-3", 2, 130),  # the second stops at once
])  # fmt: skip
def test_stop_signal_leaves_a_resumable_checkpoint_and_the_documented_exit_code(faults_setup, tmp_path, signals, point,
                                                                               newest, code):
    setup, reference, _ = faults_setup
    run = tmp_path / "run"
    child = Child(setup.train_args(run), tmp_path / "stop.log", "fork", {PAUSE_ENV: point, PAUSE_ENV + "_S": "2"})
    assert child.wait_for(PAUSED, TIMEOUT)
    messages = (f"{signals[0].name} received: finishing", "second SIGINT: stopping at once")
    for signum, seen in zip(signals, messages, strict=False):  # one or two signals
        child.signal(signum)
        assert child.wait_for(seen, TIMEOUT)  # handled before the next is sent (two pending signals are one)
    assert child.wait(TIMEOUT) == code, child.output()[-3000:]
    out = child.output()
    assert f"the last checkpoint is checkpoint-{newest}; continue with: qlorakit train --resume {run}" in out
    assert ("stopped at once" in out) == (len(signals) == 2)
    assert newest_verified(run) == (run / f"checkpoint-{newest}", [])
    assert list_checkpoints(run)[-1].name == f"checkpoint-{newest}" and not _temporaries(run)
    _resume(run, tmp_path / "resume.log")
    assert check_round(run, reference, STEPS) == []


def test_without_save_on_preempt_sigterm_kills_at_once(faults_setup, tmp_path):
    setup, _, _ = faults_setup
    run = tmp_path / "run"
    child = Child([*setup.train_args(run), "--no-save-on-preempt"], tmp_path / "log", "fork",
                  {PAUSE_ENV: "before-optimizer-step@step-2", PAUSE_ENV + "_S": "30"})
    assert child.wait_for(PAUSED, TIMEOUT)
    child.signal(signal.SIGTERM)
    assert child.wait(TIMEOUT) == -signal.SIGTERM  # Python's default: killed by the signal, no checkpoint of step 2
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
