"""The training loop: token-mean loss over the accumulated batch, exact resume, checkpoints, metrics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.data import build_datasets, collate_fn
from qlorakit.train import list_checkpoints, read_metrics, train
from qlorakit.train.loss import token_loss_sum
from tests.helpers.train import run_config, tiny_qlora_model

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens", "elapsed_s", "tokens_per_s"}


def _setup(cfg, tokenizer):
    train_set, val_set, _ = build_datasets(cfg.data, tokenizer)
    model = tiny_qlora_model(len(tokenizer), cfg.lora)
    return model, train_set, val_set, collate_fn(tokenizer)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_run_writes_metrics_checkpoints_and_learns(smol_tokenizer, small_oasst, tmp_path):
    cfg = run_config(small_oasst, tmp_path / "run", save_steps=3, max_steps=8)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    result = train(model, train_set, val_set, collate, cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(REQUIRED <= set(r) for r in train_rows)
    assert all(b["tokens"] > a["tokens"] for a, b in itertools.pairwise(train_rows))
    assert train_rows[0]["lr"] == 0.0  # warmup starts at 0 as in the transformers schedules
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # lr 1e-2 on a tiny model: it must learn something
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-6", "checkpoint-8"]  # limit 2
    ckpt = tmp_path / "run" / "checkpoint-8"
    assert {p.name for p in ckpt.iterdir()} == {
        "adapter", "optimizer.safetensors", "rng.safetensors", "trainer_state.json", "manifest.json"}  # issue 16
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["micro_index"] == 16
    assert len(load_file(str(ckpt / "optimizer.safetensors"))) == 3 * 28  # step, exp_avg, exp_avg_sq x 28 A/B
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]
    assert result.steps == 8 and result.tokens == train_rows[-1]["tokens"]


def test_loss_is_the_token_mean_of_the_whole_accumulated_batch(smol_tokenizer, small_oasst, tmp_path):
    cfg = run_config(small_oasst, tmp_path / "run", max_steps=1, lr=1e-12, warmup_ratio=0.0, scheduler="constant")
    model, train_set, _val_set, collate = _setup(cfg, smol_tokenizer)
    model.eval()  # no dropout, so the reference below sees the same function
    from qlorakit.train.loop import MicroBatchStream

    stream = MicroBatchStream(train_set.lengths, 2, cfg.data.seed, True)
    micro = [collate([train_set[i] for i in stream.at(k)[1]]) for k in range(2)]
    with torch.no_grad():
        sums, counts = zip(*(token_loss_sum(model, b) for b in micro), strict=True)
    expected = float(sum(sums)) / sum(counts)
    mean_of_means = sum(float(s) / c for s, c in zip(sums, counts, strict=True)) / 2
    assert abs(expected - mean_of_means) > 1e-4  # the two definitions differ on this data
    model.train = lambda mode=True: model  # keep eval mode (no dropout) inside train()
    train(model, train_set, [], collate, cfg, tmp_path / "run", progress=False)
    assert _losses(tmp_path / "run")[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("stop_at", [2, 3])
def test_resume_continues_the_exact_loss_sequence_across_an_epoch_boundary(
    smol_tokenizer, small_oasst, tmp_path, stop_at
):
    # 10 train examples / batch 2 = 5 micro-batches per epoch, 4 per step: steps 2 and 4 cross epochs.
    cfg = run_config(small_oasst, tmp_path / "full", save_steps=1)
    model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
    assert len(train_set) == 10
    train(model, train_set, val_set, collate, cfg, tmp_path / "full", progress=False)
    full = _losses(tmp_path / "full")

    cfg_b = run_config(small_oasst, tmp_path / "cut", save_steps=1)
    model, train_set, val_set, collate = _setup(cfg_b, smol_tokenizer)
    train(model, train_set, val_set, collate, cfg_b, tmp_path / "cut", progress=False, stop_after_steps=stop_at)
    assert len(_losses(tmp_path / "cut")) == stop_at
    model, train_set, val_set, collate = _setup(cfg_b, smol_tokenizer)  # a fresh process would rebuild everything
    resume = list_checkpoints(tmp_path / "cut")[-1]
    assert resume.name == f"checkpoint-{stop_at}"
    train(model, train_set, val_set, collate, cfg_b, tmp_path / "cut", resume_from=resume, progress=False)
    assert _losses(tmp_path / "cut") == full  # bit-identical on CPU fp32
    evals_full = [r["eval_loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "eval_loss" in r]
    evals_cut = [r["eval_loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "eval_loss" in r]
    assert evals_cut == evals_full


def test_gradient_checkpointing_recomputes_the_same_losses(smol_tokenizer, small_oasst, tmp_path):
    # Recomputation in backward replays the saved RNG state, so even the LoRA dropout masks (p = 0.1) repeat:
    # checkpointing must not change any step's loss beyond fp32 rounding.
    # The same with only the first of the two blocks recomputing (memory.checkpoint_blocks).
    runs = {}
    for ckpt, blocks in ((False, 0), (True, 0), (True, 1)):
        run_dir = tmp_path / f"{ckpt}-{blocks}"
        cfg = run_config(small_oasst, run_dir, max_steps=3, gradient_checkpointing=ckpt, checkpoint_blocks=blocks)
        model, train_set, val_set, collate = _setup(cfg, smol_tokenizer)
        seen: list[bool] = []  # checkpointing as the run had it (train.rewrites switches it off again on exit)
        train(model, train_set, val_set, collate, cfg, run_dir, progress=False,
              evaluator=lambda m, seen=seen: seen.append(m.is_activation_checkpointing) or {})
        assert seen == [ckpt] and not model.is_activation_checkpointing
        runs[ckpt, blocks] = _losses(run_dir)
    assert len(runs[True, 0]) == 3
    assert runs[True, 0] == pytest.approx(runs[False, 0], rel=1e-6, abs=0)
    assert runs[True, 1] == pytest.approx(runs[False, 0], rel=1e-6, abs=0)
