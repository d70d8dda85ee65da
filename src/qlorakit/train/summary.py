"""The end of a run: the final adapter (written durably, as a checkpoint is), the loss plot and a summary.

A full fine-tuning run (``train.full``) ends with a whole model directory, ``<run>/model``, instead: the caller
passes the writer (``qlorakit train``: ``models.export.merge_and_export``; ``train`` does not import ``models``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from qlorakit.errors import StorageError
from qlorakit.fileio import write_dir_atomic
from qlorakit.lora import save_adapter
from qlorakit.train.faults import pause_point
from qlorakit.train.loop import TrainResult
from qlorakit.train.metrics import plot_run

ADAPTER_DIR = "adapter"
#: The final model of a full fine-tuning run (a Hugging Face model directory).
MODEL_DIR = "model"


def finish_run(model, tokenizer, result: TrainResult, data_summary=None, adapter_from: Path | None = None,
               write_model: Callable[[Path], object] | None = None) -> str:
    """Save ``<run>/adapter`` (PEFT layout, with the tokenizer files), draw ``loss.png``, return the summary.

    ``adapter_from``: copy that adapter directory instead of saving ``model``'s (an FSDP run: its last
    checkpoint holds the consolidated adapter of the last step, gathered whole while the shards were live).
    ``write_model``: a full fine-tuning run; ``write_model(<run>/model)`` writes the whole trained model there
    (durably, with the tokenizer) instead of an adapter.
    """
    if write_model is not None:
        model_dir = Path(result.run_dir) / MODEL_DIR
        try:
            write_model(model_dir)
        except OSError as exc:
            raise StorageError(f"writing the final model {model_dir} failed: {exc.strerror or exc}; the run's last "
                               f"checkpoint holds the same weights (its model.safetensors)") from exc
        return format_summary(result, model_dir, plot_run(result.run_dir), what="model")
    adapter_dir = Path(result.run_dir) / ADAPTER_DIR

    def fill(directory: Path) -> None:
        if adapter_from is not None:
            shutil.copytree(adapter_from, directory, dirs_exist_ok=True)
        else:
            save_adapter(model, directory, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    try:
        write_dir_atomic(adapter_dir, fill, at=lambda point: pause_point(point, ADAPTER_DIR))
    except OSError as exc:
        raise StorageError(f"writing the final adapter {adapter_dir} failed: {exc.strerror or exc}; the run's last "
                           f"checkpoint holds the same adapter (its adapter/ folder)") from exc
    plot = plot_run(result.run_dir)
    return format_summary(result, adapter_dir, plot)


def format_summary(result: TrainResult, adapter_dir: Path, plot: Path, what: str = "adapter") -> str:
    lines = ["", "=== qlorakit run summary ==="]
    lines.append(f"steps            {result.steps}")
    if result.losses:
        lines.append(f"train loss       first {result.losses[0]:.4f} -> last {result.losses[-1]:.4f}")
    if result.bad_steps:
        lines.append(f"skipped updates  {result.bad_steps} (non-finite loss or gradient norm; see metrics.jsonl)")
    if result.eval_losses:
        (s0, e0), (s1, e1) = result.eval_losses[0], result.eval_losses[-1]
        lines.append(f"held-out loss    step {s0}: {e0:.4f} -> step {s1}: {e1:.4f}")
    lines.append(f"tokens           {result.tokens:,} in {result.train_seconds:.1f} s "
                 f"({result.tokens_per_s:.1f} tokens/s)")
    lines.append(f"peak RSS         {result.peak_rss_mb:.0f} MiB")
    lines.append(f"{what:<17}{adapter_dir}")
    lines.append(f"loss plot        {plot}")
    lines.append(f"metrics          {Path(result.run_dir) / 'metrics.jsonl'}")
    return "\n".join(lines)
