"""The scheduler: one background thread that decodes every admitted request together (continuous batching).

Each turn of the loop, between two decoding steps:

1. run the queued commands (adapter load / delete: they change the model's layers, so only this thread
   does it, and the decoder's bound projections are taken again afterwards);
2. drop the requests whose client went away (their slot and KV cache are freed);
3. admit waiting requests while fewer than ``max_batch`` run: each is prefilled alone
   (``BatchDecoder.prefill``) and its first token chosen;
4. one ``BatchDecoder.step`` for all running requests, ordered by adapter so that each adapter's rows
   are one run; every row chooses its next token with its own sampling settings and generator
   (``generate.sampling.next_token``) -- greedy rows are ``argmax``, as ``generate`` does alone.

A request ends at a stop token (EOS, not part of the text), at a stop string (the text ends before it),
or after ``max_tokens``. Its text is streamed as ``TextStream`` pieces through ``StopScanner``; events go
to the request's ``emit`` callback (``("text", piece)``, then ``("done", Outcome)`` or ``("error", msg)``).
An error inside one turn ends the requests it touched with an error and the loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from qlorakit.generate.batched import BatchDecoder, Sequence
from qlorakit.generate.decode import TextStream, stop_token_ids
from qlorakit.generate.sampling import SamplingConfig, next_token
from qlorakit.serve.metrics import Metrics
from qlorakit.serve.registry import AdapterRegistry
from qlorakit.serve.text import StopScanner

log = logging.getLogger("qlorakit.serve")


class QueueFullError(RuntimeError):
    """The bounded queue holds ``max_queue`` requests already."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (stopped, or its thread ended)."""


@dataclass
class Outcome:
    """How a request ended: its counts, its text, and the time it waited for a slot and took in all."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    text: str
    queue_seconds: float
    seconds: float


@dataclass
class Job:
    """One generation request as the engine sees it."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[tuple[str, Any]], None]
    stops: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass
class _Active:
    job: Job
    sequence: Sequence
    generator: torch.Generator | None
    stream: TextStream
    scanner: StopScanner
    admitted: float
    tokens: list[int] = field(default_factory=list)


class Engine:
    """The decoding thread; ``submit`` jobs, ``cancel`` them, ``call`` a function on its thread."""

    def __init__(self, model: Any, tokenizer: Any, registry: AdapterRegistry, metrics: Metrics,
                 max_batch: int = 16, max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.registry, self.metrics = model.eval(), tokenizer, registry, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.decoder = BatchDecoder(model)
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._commands: list[tuple[Callable[[], Any], Future]] = []
        self._running: list[_Active] = []
        self._deleting: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="qlorakit-serve-engine", daemon=True)

    # --- the HTTP side -------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise ``QueueFullError`` / ``EngineStoppedError``."""
        with self._cond:
            if not self.alive:
                raise EngineStoppedError("the generation engine is not running")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (the queue holds {self.max_queue})")
            self._pending.append(job)
            self.metrics.set("qlorakit_queue_depth", len(self._pending))
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at the next step boundary (a client that went away); its slot is freed."""
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` on the engine thread between two steps; its result or exception in the future."""
        future: Future = Future()
        with self._cond:
            if not self.alive:
                raise EngineStoppedError("the generation engine is not running")
            self._commands.append((function, future))
            self._cond.notify_all()
        return future

    def delete_adapter(self, name: str) -> None:
        """Forget ``name`` now; its weights are deleted once no admitted or waiting request uses it."""
        self.registry.forget(name)
        with self._cond:
            self._deleting.add(name)
            self._cond.notify_all()

    def load_adapter(self, spec: Any) -> Future:
        def load() -> list[str]:
            paths = self.registry.load(spec)
            self._rebind()
            return paths

        return self.call(load)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return len(self._running), len(self._pending)

    # --- the engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._running or self._commands or self._deleting):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
                admit = []
                while self._pending and len(self._running) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
                self.metrics.set("qlorakit_queue_depth", len(self._pending))
            for function, future in commands:
                self._run_command(function, future)
            self._turn(admit)
        with self._cond:
            left, self._pending = [a.job for a in self._running] + list(self._pending), deque()
        for job in left:
            job.emit(("error", "the server is shutting down"))
        self._running = []

    def _run_command(self, function: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(function())
        except Exception as exc:  # the caller reports it; the engine goes on
            future.set_exception(exc)

    def _turn(self, admit: list[Job]) -> None:
        self._drop_cancelled()
        for job in admit:
            if job.cancelled:
                self.metrics.add("qlorakit_cancelled_total")
                continue
            self._guarded([job], lambda job=job: self._admit(job))
        if self._running:
            rows = list(self._running)
            self._guarded([a.job for a in rows], lambda: self._step(rows))
        self._delete_unused()
        self.metrics.set("qlorakit_batch_size", len(self._running))

    def _guarded(self, jobs: list[Job], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # one bad turn must not stop the server: end the requests it touched
            log.exception("generation failed")
            ids = {id(j) for j in jobs}
            self._running = [a for a in self._running if id(a.job) not in ids]
            for job in jobs:
                job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))

    def _admit(self, job: Job) -> None:
        sequence = self.decoder.new_sequence(job.adapter, len(job.prompt_ids) + job.max_tokens)
        generator = None if job.sampling.greedy else job.sampling.generator()
        active = _Active(job, sequence, generator, TextStream(self.tokenizer), StopScanner(job.stops),
                         time.perf_counter())
        logits = self.decoder.prefill(sequence, job.prompt_ids)  # (vocab,)
        self._running.append(active)
        self._accept(active, next_token(logits, job.sampling, generator))

    def _step(self, rows: list[_Active]) -> None:
        rows.sort(key=lambda a: "" if a.job.adapter is None else "~" + a.job.adapter)  # one run per adapter
        logits = self.decoder.step([a.sequence for a in rows], [a.tokens[-1] for a in rows])  # (N, vocab)
        self.metrics.add("qlorakit_decode_steps_total")
        self.metrics.add("qlorakit_decode_rows_total", len(rows))
        for active, row in zip(rows, logits, strict=True):
            self._accept(active, next_token(row, active.job.sampling, active.generator))

    def _accept(self, active: _Active, token: int) -> None:
        """Take one chosen token: finish at a stop token, a stop string or ``max_tokens``, else stream it."""
        if token in self.stop_ids:
            return self._finish(active, "stop")
        active.tokens.append(token)
        piece = active.scanner.push(active.stream.push(token))
        if piece:
            active.job.emit(("text", piece))
        if active.scanner.stopped:
            self._finish(active, "stop")
        elif len(active.tokens) >= active.job.max_tokens:
            self._finish(active, "length")

    def _finish(self, active: _Active, reason: str) -> None:
        self._running.remove(active)
        tail = active.scanner.push(active.stream.finish()) + active.scanner.finish()
        if tail:
            active.job.emit(("text", tail))
        now, job = time.perf_counter(), active.job
        outcome = Outcome(len(job.prompt_ids), len(active.tokens), reason, active.scanner.output,
                          active.admitted - job.submitted, now - job.submitted)
        self.metrics.add("qlorakit_prompt_tokens_total", outcome.prompt_tokens)
        self.metrics.add("qlorakit_completion_tokens_total", outcome.completion_tokens)
        self.metrics.add("qlorakit_request_seconds_total", outcome.seconds)
        self.metrics.add("qlorakit_queue_seconds_total", outcome.queue_seconds)
        job.emit(("done", outcome))

    def _drop_cancelled(self) -> None:
        gone = [a for a in self._running if a.job.cancelled]
        for active in gone:  # counted first: whoever sees the slot free also sees the cancellation counted
            self.metrics.add("qlorakit_cancelled_total")
            self._running.remove(active)

    def _delete_unused(self) -> None:
        with self._cond:
            in_use = {a.job.adapter for a in self._running} | {j.adapter for j in self._pending}
            ready = self._deleting - in_use
            self._deleting -= ready
        for name in ready:
            self.registry.unload(name)
        if ready:
            self._rebind()

    def _rebind(self) -> None:
        """Take the layers' bound projections again (loading or deleting an adapter can wrap or unwrap one)."""
        self.decoder = BatchDecoder(self.model)
        self.metrics.set("qlorakit_adapters", len(self.registry.names()))
