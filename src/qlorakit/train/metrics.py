"""The run's record: ``metrics.jsonl`` (one JSON object per logged step) and ``loss.png``.

Training rows: ``step, loss, lr, grad_norm, tokens, elapsed_s, tokens_per_s, epoch, peak_rss_mb, bad_steps``
(and ``cuda_max_allocated_mb`` on a GPU); a step whose update was skipped also has ``skipped`` (why), and
its non-finite ``loss`` / ``grad_norm`` are ``null``; the step after which the heap guard fixed glibc's threshold
has ``heap_guard`` (its message; ``train.allocator``). Evaluation rows: ``step, eval_loss, eval_tokens``.

Each step appears once: on resume the rows after the checkpoint's step are dropped (and a line torn by a
kill mid-write with them), and the file is fsynced before every checkpoint, so a checkpoint on the disk
implies its rows are too.

``write`` is the one place a row is written: it also hands the row to the run's trackers
(``train.tracking``: TensorBoard, W&B, MLflow; ``TrainConfig.report_to``), so they see exactly these rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlorakit.fileio import fsync_path, save_figure_atomic, write_text_atomic
from qlorakit.train.tracking import Trackers

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` and sends them to the trackers named in ``report_to`` (with ``config``,
    the run's config as a plain dict); on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, report_to: tuple[str, ...] = ("none",),
                 config: dict | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [row for row in _readable_rows(self.path) if row.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.trackers = Trackers(report_to, Path(run_dir), config, resume_step)

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.trackers.log(row)

    def close(self) -> None:
        """End the trackers' runs (``metrics.jsonl`` needs nothing: every row is flushed as it is written)."""
        self.trackers.close()

    def sync(self) -> None:
        """fsync the rows written so far (before a checkpoint, so that they outlive a power cut with it)."""
        if self.path.exists():
            fsync_path(self.path)


class NoLog:
    """The log of a rank other than 0 in a multi-process run: rank 0 alone writes ``metrics.jsonl``."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        """Nothing to close: this rank writes no rows."""

    def sync(self) -> None:
        pass


def _readable_rows(path: Path) -> list[dict]:
    """The rows of ``path`` that parse (a process killed mid-write leaves a torn last line)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str | Path) -> Path:
    """Draw training loss (and eval loss when logged) against step into ``<run_dir>/loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = save_figure_atomic(fig, run_dir / PLOT_FILE)
    plt.close(fig)
    return out
