"""Counters and gauges of the server, written in the Prometheus text exposition format (``GET /metrics``).

Each metric is a name, a type (counter or gauge), a help line and samples with optional labels:

    # HELP qlorakit_requests_total Requests answered, by endpoint, model and HTTP status.
    # TYPE qlorakit_requests_total counter
    qlorakit_requests_total{endpoint="chat",model="base",status="200"} 3

Batch size is given as two counters, decoding steps and rows decoded (their ratio is the mean batch), and
the current batch and queue depth as gauges.
"""

from __future__ import annotations

import threading
from collections import defaultdict

_HELP = {
    "qlorakit_requests_total": ("counter", "Requests answered, by endpoint, model and HTTP status."),
    "qlorakit_prompt_tokens_total": ("counter", "Prompt tokens of finished generations."),
    "qlorakit_completion_tokens_total": ("counter", "Tokens generated."),
    "qlorakit_cancelled_total": ("counter", "Generations cancelled because the client went away."),
    "qlorakit_decode_steps_total": ("counter", "Batched decoding steps."),
    "qlorakit_decode_rows_total": ("counter", "Rows (sequences) over all decoding steps; / steps = mean batch."),
    "qlorakit_request_seconds_total": ("counter", "Sum of request latencies (submission to last token)."),
    "qlorakit_queue_seconds_total": ("counter", "Sum of the time requests waited for a batch slot."),
    "qlorakit_batch_size": ("gauge", "Sequences in the batch being decoded now."),
    "qlorakit_queue_depth": ("gauge", "Requests waiting for a batch slot."),
    "qlorakit_adapters": ("gauge", "Adapters loaded."),
}


def _escape(value: str) -> str:
    """A label value in the exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


class Metrics:
    """Thread-safe metric values; ``render`` gives the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        for name in _HELP:
            if not name.startswith("qlorakit_requests"):
                self._values[name][()] = 0.0

    def add(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name][()] = float(value)

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for labels, value in sorted(self._values[name].items()):
                    number = int(value) if float(value).is_integer() else round(value, 6)
                    lines.append(f"{name}{_labels(labels)} {number}")
        return "\n".join(lines) + "\n"
