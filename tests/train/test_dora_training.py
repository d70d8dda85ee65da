"""Training a DoRA adapter: the magnitudes train, are checkpointed, and resume continues the exact losses."""

from __future__ import annotations

import dataclasses

from safetensors.torch import load_file

from qlorakit.data import build_datasets, collate_fn
from qlorakit.train import list_checkpoints, read_metrics, train
from tests.helpers.train import run_config, tiny_qlora_model


def _dora_run(tokenizer, data, out, **fields):
    cfg = run_config(data, out, **fields)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dora=True))
    train_set, val_set, _ = build_datasets(cfg.data, tokenizer)
    return cfg, tiny_qlora_model(len(tokenizer), cfg.lora), train_set, val_set, collate_fn(tokenizer)


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_dora_magnitudes_train_and_resume_reproduces_the_losses(smol_tokenizer, small_oasst, tmp_path):
    cfg, model, train_set, val_set, collate = _dora_run(smol_tokenizer, small_oasst, tmp_path / "full",
                                                        save_steps=1, max_steps=4)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(start) == 14
    train(model, train_set, val_set, collate, cfg, tmp_path / "full", progress=False)
    moved = [float((p.detach() - start[n]).abs().max()) for n, p in model.named_parameters() if n in start]
    assert min(moved) > 0
    saved = load_file(str(tmp_path / "full" / "checkpoint-4" / "adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == 14
    full = _losses(tmp_path / "full")

    cfg, model, train_set, val_set, collate = _dora_run(smol_tokenizer, small_oasst, tmp_path / "cut",
                                                        save_steps=1, max_steps=4)
    train(model, train_set, val_set, collate, cfg, tmp_path / "cut", progress=False, stop_after_steps=2)
    cfg, model, train_set, val_set, collate = _dora_run(smol_tokenizer, small_oasst, tmp_path / "cut",
                                                        save_steps=1, max_steps=4)
    resume = list_checkpoints(tmp_path / "cut")[-1]
    train(model, train_set, val_set, collate, cfg, tmp_path / "cut", resume_from=resume, progress=False)
    assert _losses(tmp_path / "cut") == full  # bit-identical on CPU fp32
