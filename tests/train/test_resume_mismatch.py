"""Resuming a run whose saved optimizer state does not match the model fails clearly, before any step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlorakit.cli.main import main
from qlorakit.train import read_metrics
from qlorakit.train.manifest import write_manifest


@pytest.fixture(scope="module")
def tiny_dir(smol_tokenizer, save_tiny_llama) -> Path:
    """A 1-layer random Llama with the SmolLM2 tokenizer, saved as safetensors."""
    return save_tiny_llama("tiny_llama_resume", smol_tokenizer, vocab_size=len(smol_tokenizer), hidden_size=32,
                           num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
                 "--grad-accum", "1", "--lora-r", "4", "--val-size", "0", "--compute-dtype", "float32",
                 "--no-progress", "--source-max-len", "32", "--target-max-len", "16", "--optim", "adamw",
                 "--no-gradient-checkpointing", *extra])  # fmt: skip


def _rewrite_optimizer_state(checkpoint: Path, change) -> None:
    path = checkpoint / "optimizer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # a safe_open handle: keys(), not iteration
    save_file(change(tensors), str(path), metadata=metadata)
    write_manifest(checkpoint)  # a consistent checkpoint whose state does not fit (not a corrupted one)


@pytest.mark.parametrize("case", ["shape", "missing-moment"])
def test_resume_with_mismatched_optimizer_state_fails_before_training(tiny_dir, small_oasst, tmp_path, capsys, case):
    run = tmp_path / "run"
    assert _train(tiny_dir, small_oasst, run, "--max-steps", "2", "--save-steps", "1") == 0
    checkpoint = run / "checkpoint-2"
    if case == "shape":  # state saved for a wider adapter than the model has
        def change(t):
            return {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "state.0.exp_avg" else v)
                    for k, v in t.items()}
    else:
        def change(t):
            return {k: v for k, v in t.items() if k != "state.0.exp_avg_sq"}
    _rewrite_optimizer_state(checkpoint, change)
    rows_before = read_metrics(run / "metrics.jsonl")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optimizer" in err and "parameter 0" in err
    assert str(checkpoint / "optimizer.safetensors") in err  # names the file at fault
    assert read_metrics(run / "metrics.jsonl") == rows_before  # no step was taken
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
