"""``qlorakit train --memory-budget``: the planner's choices printed, written to config.yaml, explicit flags kept,
and explicit settings that cannot fit refused before any weight is loaded."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

import qlorakit.models
from qlorakit.cli.main import main
from qlorakit.planner import PlanSettings, model_shape, plan
from qlorakit.planner.choose import KNOBS, with_knob


@pytest.fixture(scope="module")
def tiny_model_dir(smol_tokenizer, save_tiny_llama) -> Path:
    return save_tiny_llama("tiny_llama_budget", smol_tokenizer, vocab_size=len(smol_tokenizer),
                           tie_word_embeddings=True)


NO_ARENA_PICK = "allocator = dynamic  (arena is unavailable (QLORAKIT_ARENA=0); fits"

def _with(settings: PlanSettings, **knobs) -> PlanSettings:
    for knob, value in knobs.items():
        settings = with_knob(settings, knob, value)
    return settings


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "4", "--val-size", "4", "--compute-dtype", "float32", "--no-progress",
            "--source-max-len", "64", "--target-max-len", "32", *extra]  # fmt: skip


def test_a_large_budget_picks_the_fastest_settings_and_writes_them_to_config_yaml(tiny_model_dir, small_oasst,
                                                                                    tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, small_oasst, out, "--max-steps", "1", "--memory-budget", "100GB")) == 0
    printed = capsys.readouterr().out
    assert "gradient_checkpointing = False  (fastest" in printed
    assert NO_ARENA_PICK in printed  # tests/conftest.py keeps the arena off: glibc's fastest policy
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["memory"]["gradient_checkpointing"] is False and written["memory"]["malloc_trim"] is False
    assert written["memory"]["malloc_mmap_threshold_kib"] == 0 and written["optim"]["optim"] == "adamw"
    assert written["memory"]["memory_budget"] == "100GB"
    assert "# memory     predicted peak" in (out / "config.yaml").read_text()


def test_an_explicit_flag_overrides_the_choice(tiny_model_dir, small_oasst, tmp_path, capsys):
    out = tmp_path / "never"
    args = _args(tiny_model_dir, small_oasst, out, "--dry-run", "--memory-budget", "100GB", "--gradient-checkpointing",
                 "--optim", "paged_adamw")  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "gradient_checkpointing = True  (given explicitly)" in printed
    assert "optim = paged_adamw  (given explicitly)" in printed and NO_ARENA_PICK in printed


def test_explicit_settings_that_cannot_fit_fail_before_loading_weights(tiny_model_dir, small_oasst, tmp_path,
                                                                       capsys, monkeypatch):  # fmt: skip
    shape = model_shape(str(tiny_model_dir))
    base = PlanSettings(seq_len=96, batch_size=2, lora_r=4, device="cpu", compute_dtype="float32")

    def leanest(checkpointing: bool) -> int:
        rest = itertools.product(*(KNOBS[k] for k in ("allocator", "optim", "loss_chunk")))
        return min(plan(shape, _with(base, gradient_checkpointing=checkpointing, allocator=a, optim=o,
                                     loss_chunk=c)).total_bytes for a, o, c in rest)  # fmt: skip

    budget = leanest(False) - 1  # checkpointing off cannot fit; on, it would
    assert leanest(True) <= budget
    monkeypatch.setattr(qlorakit.models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "out"
    args = _args(tiny_model_dir, small_oasst, out, "--max-steps", "1", "--memory-budget", str(budget),
                 "--no-gradient-checkpointing")  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "gradient_checkpointing = False" in err and "memory budget" in err and not out.exists()
    assert main([*args[:-1], "--dry-run"]) == 0  # without the flag the planner turns checkpointing on, for the
    assert "gradient_checkpointing = 1  (the first 1 of 2 blocks recompute" in capsys.readouterr().out  # 1st block
