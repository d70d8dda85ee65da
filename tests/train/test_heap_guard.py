"""The heap guard (``train.allocator.HeapGuard``): with glibc's dynamic threshold under a memory budget, the trainer
switches to the fixed threshold once the peak RSS plus the last step's rise reaches the budget, and says so."""

from __future__ import annotations

import platform
import sys

import pytest
import yaml

from qlorakit.config import parse_size
from qlorakit.data import build_datasets, collate_fn
from qlorakit.train import allocator, read_metrics, train
from tests.helpers.train import run_config, tiny_qlora_model

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
MIB = 2**20


def _guard(peaks: list[int], budget: int) -> tuple[allocator.HeapGuard, list[int]]:
    switched: list[int] = []
    readings = iter(peaks)
    guard = allocator.HeapGuard(budget, lambda: next(readings) * MIB, lambda: switched.append(1) or True)
    return guard, switched


def test_the_guard_switches_once_when_the_next_step_could_cross_the_budget():
    # peaks 100, 150, 190, 215, 230 MiB; budget 240: 100 + 0, 150 + 50, 190 + 40 stay below; 215 + 25 reaches it
    guard, switched = _guard([100, 150, 190, 215, 230, 260], 240 * MIB)
    notes = [guard.after_step(step) for step in range(1, 7)]
    assert notes[:3] == [None, None, None] and notes[4:] == [None, None]
    assert "215 MiB + the last step's rise 25 MiB reaches the memory budget of 240 MiB" in notes[3]
    assert "fixed at 1024 KiB" in notes[3] and switched == [1] and guard.switched_at == 4


def test_a_falling_peak_is_no_rise_and_a_first_step_over_the_budget_switches_at_once():
    guard, switched = _guard([300], 240 * MIB)
    assert "peak RSS 300 MiB + the last step's rise 0 MiB" in guard.after_step(1) and switched == [1]
    guard, _ = _guard([100, 100, 100], 240 * MIB)
    assert [guard.after_step(s) for s in (1, 2, 3)] == [None, None, None]


def test_the_guard_says_when_glibc_did_not_take_the_switch():
    guard = allocator.HeapGuard(MIB, lambda: 2 * MIB, lambda: False)
    assert "nothing changed" in guard.after_step(1)


@pytest.mark.parametrize("budget,kib,cpu", [(None, 0, True), (0, 0, True), (MIB, 1024, True), (MIB, 0, False)])
def test_no_guard_without_a_budget_with_a_fixed_threshold_or_on_a_gpu(budget, kib, cpu):
    assert allocator.heap_guard(budget, kib, cpu) is None


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_a_run_over_its_budget_switches_after_step_1_and_logs_it(smol_tokenizer, small_oasst, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    switched = []
    monkeypatch.setattr(allocator, "switch_to_fixed_threshold", lambda: switched.append(1) or True)  # process-wide
    cfg = run_config(small_oasst, tmp_path / "run", max_steps=3, grad_accum=1, malloc_mmap_threshold_kib=0,
                     memory_budget="1MiB")  # any process is over 1 MiB: the guard switches after step 1
    train_set, val_set, _ = build_datasets(cfg.data, smol_tokenizer)
    model = tiny_qlora_model(len(smol_tokenizer), cfg.lora)
    train(model, train_set, val_set, collate_fn(smol_tokenizer), cfg, tmp_path / "run", progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows if "heap_guard" in r] == [1] and switched == [1]
    assert "reaches the memory budget of 1 MiB" in rows[0]["heap_guard"]
    assert "heap guard: peak RSS" in capsys.readouterr().out


def test_qlorakit_train_records_the_default_budget_for_the_guard(save_tiny_llama, smol_tokenizer, small_oasst,
                                                                 tmp_path):  # fmt: skip
    from qlorakit.cli.main import main

    model = save_tiny_llama("tiny_llama_guard", smol_tokenizer, vocab_size=len(smol_tokenizer),
                            tie_word_embeddings=True)
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(small_oasst), "--output-dir", str(out), "--batch-size", "2",
            "--lora-r", "4", "--val-size", "4", "--compute-dtype", "float32", "--no-progress", "--source-max-len",
            "64", "--target-max-len", "32", "--max-steps", "1"]  # fmt: skip
    assert main(args) == 0
    budget = yaml.safe_load((out / "config.yaml").read_text())["memory"]["memory_budget"]
    assert budget.endswith("MiB") and parse_size(budget) > 0
    assert f"heap guard: glibc's threshold is fixed at 1 MiB if the peak RSS nears the {budget} budget" in (
        out / "config.yaml").read_text()  # the plan's lines end config.yaml as comments



def test_ranks_with_different_free_memory_agree_on_the_run(small_oasst, tmp_path):
    """Each rank records its own default budget; the ranks' config check leaves it out, and only it."""
    import dataclasses

    from qlorakit.parallel import run_fingerprint

    cfg = run_config(small_oasst, tmp_path / "run", memory_budget="19718MiB")
    other = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, memory_budget="19544MiB"))
    assert run_fingerprint(cfg, [5, 7]) == run_fingerprint(other, [5, 7])
    lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3))
    assert run_fingerprint(cfg, [5, 7]) != run_fingerprint(lr, [5, 7])
    assert cfg.memory.memory_budget == "19718MiB"  # the config itself is unchanged by the check
