"""One optimizer step's log: the metrics row (loss, lr, gradient norm, tokens/s, epoch, peak RSS, skipped
updates), written every ``logging_steps`` and at the steps that must be seen (the last, a skipped one, the heap
guard's switch), and the progress bar's line."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from qlorakit.hardware import peak_rss_mb
from qlorakit.train.checkpoint import TrainerState

if TYPE_CHECKING:
    from qlorakit.train.loop import Run


def log_step(run: Run, bar: tqdm, loss: float, grad_norm: float, tokens_per_s: float, skipped: str | None,
              guarded: str | None = None) -> None:
    state = run.state
    run.result.losses.append(loss)
    row = train_row(state, loss, run.optimizer, grad_norm, tokens_per_s, run.stream.per_epoch)
    row["padding_fraction"] = round(run.padding_fraction, 4)
    if run.objective is not None:
        row.update(run.objective.last_metrics)  # rewards/..., logps/... under TRL's names
    if skipped:
        row["skipped"] = skipped
    if guarded:
        row["heap_guard"] = guarded
    if state.step % run.cfg.train.logging_steps == 0 or state.step == run.last_step or skipped or guarded:
        if run.replicas.dist.enabled:  # the job's tokens/s is in the row; memory per rank too
            row["rank_peak_rss_mb"] = [round(x, 1) for x in run.replicas.gather(row["peak_rss_mb"], "peak RSS")]
        run.log.write(row)
        note = f" (update skipped: {skipped}; {state.bad_streak} in a row)" if skipped else ""
        if run.replicas.is_main:
            bar.write(f"step {state.step}/{state.total_steps} loss {loss:.4f} lr {row['lr']:.2e} "
                      f"grad-norm {grad_norm:.3f} {row['tokens_per_s']:.0f} tok/s epoch {row['epoch']:.2f}{note}")
    if guarded:  # every rank guards its own heap
        bar.write(f"rank {run.replicas.dist.rank}: {guarded}" if run.replicas.dist.enabled else guarded)
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
    bar.update(1)


def train_row(
    state: TrainerState, loss: float, optimizer, grad_norm: float, tokens_per_s: float, per_epoch: int
) -> dict:
    def finite(x):
        return x if math.isfinite(x) else None
    row = {"step": state.step, "loss": finite(loss), "lr": optimizer.param_groups[0]["lr"],
           "grad_norm": finite(grad_norm),
           "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 4), "tokens_per_s": round(tokens_per_s, 2),
           "epoch": round(state.micro_index / per_epoch, 4), "peak_rss_mb": round(peak_rss_mb(), 1),
           "bad_steps": state.bad_steps}
    if torch.cuda.is_available():
        row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row
