"""Read one hostile input under a time limit and (optionally) tracemalloc; classify what happened.

Outcomes: ``ok`` (read without error), ``refused`` (a QlorakitError that passes ``check_error``),
``bad`` (any other exception, or a QlorakitError without file or position), ``hang`` (over the time
limit). The limit is a ``SIGALRM`` timer raising ``ReaderHang``, a ``BaseException`` so that no
reader's ``except Exception`` can swallow it; a reader stuck inside C code is caught when it returns
(its time is over the limit) or, in the benchmark, by killing the worker process.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fuzz_targets import Files, Target, check_error, write_files


class ReaderHang(BaseException):
    """Raised by the timer inside a reader that ran past the time limit."""


@dataclass(frozen=True)
class Outcome:
    """What reading one input did: ``kind``, the error message (or ""), seconds, tracemalloc peak bytes."""

    kind: str  # ok | refused | bad | hang
    message: str
    seconds: float
    peak_bytes: int


def _raise_hang(signum, frame):
    raise ReaderHang()


@contextmanager
def _time_limit(seconds: float):
    previous = signal.signal(signal.SIGALRM, _raise_hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def warm_up(target: Target) -> None:
    """Read the target's seed files once without a time limit (``target.warm`` first).

    The first read imports and caches (transformers' config classes take seconds on a loaded machine);
    a timer firing inside an import would leave the module half-initialized for every later input.
    """
    target.warm()
    directory = Path(tempfile.mkdtemp(prefix="qlorakit-fuzz-"))
    try:
        write_files(directory, target.seed())
        target.read(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def read_one(target: Target, files: Files, limit_s: float = 10.0, trace_memory: bool = False) -> Outcome:
    """Write ``files`` into a fresh directory, read them with ``target``, and classify the result."""
    directory = Path(tempfile.mkdtemp(prefix="qlorakit-fuzz-"))
    try:
        write_files(directory, files)
        if trace_memory:
            tracemalloc.start()
        start = time.perf_counter()
        kind, message = "ok", ""
        try:
            with _time_limit(limit_s):
                target.read(directory)
        except ReaderHang:
            kind, message = "hang", f"no result after {limit_s} s"
        except Exception as exc:  # classified below: only qlorakit's own errors pass
            message = str(exc)
            problem = check_error(exc, directory)
            kind, message = ("refused", message) if problem is None else ("bad", problem)
            message = message.replace(str(directory), "<dir>")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
        if kind in ("ok", "refused") and seconds > limit_s:
            kind, message = "hang", f"returned after {seconds:.1f} s (limit {limit_s} s)"
        return Outcome(kind, message, seconds, peak)
    finally:
        if trace_memory:
            tracemalloc.stop()
        shutil.rmtree(directory, ignore_errors=True)
