"""Graceful stop: SIGINT or SIGTERM finishes the current optimizer step, writes a checkpoint, and ends the run.

Inside ``train`` (when ``train.save_on_preempt``, the default) the first SIGINT or SIGTERM only sets
``StopSignals.signum``; the loop finishes the step it is in (a checkpoint being written is completed),
writes ``checkpoint-<step>`` and returns with ``TrainResult.stopped_by`` set, and ``qlorakit train`` exits
with ``exit_code(signal)`` = 128 + the signal number (the shell's convention): 130 after SIGINT, 143 after
SIGTERM. A second SIGINT raises ``KeyboardInterrupt`` at once (a checkpoint being written is discarded;
the last complete one stays); ``qlorakit train`` exits 130 then too. Further SIGTERMs are ignored (a
scheduler's SIGKILL after its grace period is what ends a run that does not stop in time). With
``save_on_preempt: false`` no handler is installed: SIGINT raises ``KeyboardInterrupt`` at once and
SIGTERM kills the process (Python's defaults).
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class StopSignals:
    """``with StopSignals(enabled) as stop:`` — ``stop.signum`` is the first stop signal received, or None."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> StopSignals:  # noqa: PYI034  (typing.Self needs Python 3.11)
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            _say(f"qlorakit: {signal.Signals(signum).name} received: finishing the current step, then writing a "
                 "checkpoint (Ctrl-C again stops at once)")
        elif signum == signal.SIGINT:
            _say("qlorakit: second SIGINT: stopping at once (the last complete checkpoint stays)")
            raise KeyboardInterrupt
        else:
            _say(f"qlorakit: {signal.Signals(signum).name} again: still finishing the step")


def _say(text: str) -> None:
    """Write one line to stderr without Python's buffered streams (a handler may interrupt a write to them)."""
    os.write(2, (text + "\n").encode())
