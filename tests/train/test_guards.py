"""The trainer's guards: a full or failing disk, and non-finite losses or gradients."""

from __future__ import annotations

import errno
import math
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import qlorakit.fileio
import qlorakit.train.checkpoint
from qlorakit.data import build_datasets, collate_fn
from qlorakit.errors import StorageError, TrainingDivergedError
from qlorakit.train import list_checkpoints, read_metrics, train
from qlorakit.train.manifest import verify
from tests.helpers.train import run_config, tiny_qlora_model


def _setup(cfg, tokenizer):
    train_set, val_set, _ = build_datasets(cfg.data, tokenizer)
    return tiny_qlora_model(len(tokenizer), cfg.lora), train_set, val_set, collate_fn(tokenizer)


def _train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


# --- disk full / unwritable ------------------------------------------------------------------------


def _failing_after(calls: int, exc: OSError, real):
    """``real`` for the first ``calls`` calls, then a half-written file and ``exc`` (as a full disk does)."""
    count = {"n": 0}

    def write(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] > calls:
            Path(filename).write_bytes(b"\0" * 100)
            raise exc
        return real(tensors, filename, metadata=metadata)

    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_how_much_space_it_needs(
        smol_tokenizer, small_oasst, tmp_path, monkeypatch, code):
    run = tmp_path / "run"
    cfg = run_config(small_oasst, run, save_steps=1, max_steps=4)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    # two save_file calls per checkpoint (optimizer, rng): checkpoints 1 and 2 succeed, the third write fails
    error = OSError(code, f"simulated: {errno.errorcode[code]}")
    failing = _failing_after(4, error, qlorakit.train.checkpoint.save_file)
    monkeypatch.setattr(qlorakit.train.checkpoint, "save_file", failing)
    with pytest.raises(StorageError) as info:
        train(model, train_set, val_set, collate, cfg, run, progress=False)
    message = str(info.value)
    assert f"writing {run / 'checkpoint-3'} failed: simulated: {errno.errorcode[code]}" in message
    assert "The checkpoint needs about " in message and " MiB are free" in message
    assert "the previous checkpoint (checkpoint-2) is intact" in message and f"--resume {run}" in message
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert verify(run / "checkpoint-2") == []
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # the half-written staging dir is gone


def test_a_failing_fsync_is_a_failed_write_too(smol_tokenizer, small_oasst, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = run_config(small_oasst, run, save_steps=1, max_steps=2)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    real = qlorakit.fileio.fsync_tree

    def fsync_tree(root):
        if Path(root).name == "checkpoint-2":  # the staged checkpoint-2 (checkpoint-1's and the adapters' pass)
            raise OSError(errno.EIO, "Input/output error")
        real(root)

    monkeypatch.setattr(qlorakit.fileio, "fsync_tree", fsync_tree)
    with pytest.raises(StorageError, match="checkpoint-2 failed: Input/output error"):
        train(model, train_set, val_set, collate, cfg, run, progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"] and verify(run / "checkpoint-1") == []


def test_too_little_free_space_for_one_checkpoint_fails_before_the_first_step(smol_tokenizer, small_oasst, tmp_path,
                                                                              monkeypatch):
    run = tmp_path / "run"
    cfg = run_config(small_oasst, run, save_steps=1, max_steps=2)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(qlorakit.train.checkpoint.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(StorageError, match=r"0\.0 MiB free, but one checkpoint needs about 1\.\d MiB"):
        train(model, train_set, val_set, collate, cfg, run, progress=False)
    assert not list_checkpoints(run) and not (run / "metrics.jsonl").exists()


def test_the_estimate_is_an_upper_bound_of_the_checkpoint_written(smol_tokenizer, small_oasst, tmp_path):
    run = tmp_path / "run"
    cfg = run_config(small_oasst, run, max_steps=1, optim="adamw")
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    estimate = qlorakit.train.checkpoint.checkpoint_bytes_estimate(model, run)
    train(model, train_set, val_set, collate, cfg, run, progress=False)
    written = sum(p.stat().st_size for p in (run / "checkpoint-1").rglob("*") if p.is_file())
    assert written <= estimate < written + 2 * qlorakit.train.checkpoint.CHECKPOINT_SLACK
    assert qlorakit.train.checkpoint.checkpoint_bytes_estimate(model, run) == written - (
        run / "checkpoint-1" / "manifest.json").stat().st_size  # once written, the manifest's own total


# --- non-finite loss or gradient ---------------------------------------------------------------------


def _inject_nan_gradient(model, steps: set[int], grad_accum: int) -> None:
    """Make one adapter's gradient NaN in every backward of the optimizer steps ``steps`` (1-based)."""
    weight = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * math.nan if (calls["n"] - 1) // grad_accum + 1 in steps else grad

    weight.register_hook(hook)


def test_a_non_finite_gradient_skips_the_update_and_is_counted(smol_tokenizer, small_oasst, tmp_path):
    runs = {}
    for name, bad in (("clean", set()), ("nan", {3})):
        cfg = run_config(small_oasst, tmp_path / name, save_steps=1, max_steps=5, save_total_limit=0)
        model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
        _inject_nan_gradient(model, bad, cfg.train.grad_accum)
        result = train(model, train_set, val_set, collate, cfg, tmp_path / name, progress=False)
        runs[name] = (_train_rows(tmp_path / name), result)
    (clean, _), (rows, result) = runs["clean"], runs["nan"]
    assert result.steps == 5 and result.bad_steps == 1
    assert rows[2]["skipped"] == "non-finite gradient norm (nan)" and rows[2]["grad_norm"] is None
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert "skipped" not in rows[1] and "skipped" not in rows[3]
    # the skipped step still consumed its micro-batches: the same data (tokens) step for step, and step 3's
    # loss is the clean run's (the update before it is the same)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in clean] and rows[2]["loss"] == clean[2]["loss"]
    # no update at step 3: no checkpoint there, and the adapter at step 4's start is the one after step 2
    assert not (tmp_path / "nan" / "checkpoint-3").exists()
    before = (tmp_path / "nan" / "checkpoint-2" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert before == (tmp_path / "clean" / "checkpoint-2" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_max_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(smol_tokenizer, small_oasst, tmp_path):
    run = tmp_path / "run"
    cfg = run_config(small_oasst, run, save_steps=1, max_steps=8, max_bad_steps=3)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    _inject_nan_gradient(model, {3, 5, 6, 7}, cfg.train.grad_accum)  # step 3 alone is tolerated; 5-7 stop it
    with pytest.raises(TrainingDivergedError) as info:
        train(model, train_set, val_set, collate, cfg, run, progress=False)
    message = str(info.value)
    assert message.startswith("steps 5-7: 3 optimizer steps in a row had a non-finite loss or gradient norm")
    assert f"the last good checkpoint is {run / 'checkpoint-4'}" in message and "--max-bad-steps 3" in message
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]  # limit 2; 3 and 5-7 skipped
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["step"] for r in rows if "skipped" in r] == [3, 5, 6, 7] and rows[-1]["bad_steps"] == 4


def test_a_non_finite_loss_is_skipped_with_its_reason(smol_tokenizer, small_oasst, tmp_path, monkeypatch):
    import qlorakit.train.loop

    real, calls = qlorakit.train.loop.token_loss_sum, {"n": 0}

    def loss_sum(model, batch, chunk_tokens=256):
        loss, count = real(model, batch, chunk_tokens)
        calls["n"] += model.training
        return (loss * math.inf if model.training and calls["n"] == 3 else loss), count  # step 2's first micro-batch

    monkeypatch.setattr(qlorakit.train.loop, "token_loss_sum", loss_sum)
    cfg = run_config(small_oasst, tmp_path / "run", max_steps=3)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    result = train(model, train_set, val_set, collate, cfg, tmp_path / "run", progress=False)
    rows = _train_rows(tmp_path / "run")
    assert rows[1]["skipped"] == "non-finite loss (inf)" and rows[1]["loss"] is None and result.bad_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_help_documents_the_reliability_flags_with_their_defaults(capsys):
    from qlorakit.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--save-on-preempt, --no-save-on-preempt" in text and "exit 130/143" in text
    assert "--max-bad-steps" in text and "non-finite loss or gradient norm (default: 3)" in text
    assert "Exit status: 0 done; 2 an error" in text
