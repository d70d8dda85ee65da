"""``qlorakit train --method dpo|orpo`` end to end on a tiny Llama: metrics under TRL's names, learning, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlorakit.cli.main import main
from qlorakit.train import read_metrics

PAIR_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"}


@pytest.fixture(scope="module")
def tiny_model_dir(smol_tokenizer, save_tiny_llama) -> Path:
    return save_tiny_llama("tiny_llama_pref", smol_tokenizer, vocab_size=len(smol_tokenizer), tie_word_embeddings=True)


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    """8 prompts x 2 pairs: the chosen answer is always the polite one (an easy preference to learn)."""
    rows = []
    for i, topic in enumerate(["cats", "tea", "rain", "maps", "bread", "chess", "boats", "songs"]):
        for rude in ("No.", "Go away."):
            rows.append({"prompt": f"Tell me one fact about {topic}.", "chosen": f"Sure! Here is a fact about "
                         f"{topic}: it is interesting {i}.", "rejected": rude})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model: Path, data: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--method", method,
            "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", "--val-size", "4", "--compute-dtype",
            "float32", "--no-progress", "--source-max-len", "64", "--target-max-len", "32", "--lr", "1e-2",
            "--no-gradient-checkpointing", "--lora-dropout", "0.0", "--max-steps", "4", "--save-steps", "2", *extra]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_run_logs_trl_metrics_learns_and_resumes_to_the_same_result(
        method, tiny_model_dir, pairs_file, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, pairs_file, full, method)) == 0
    assert f"objective  {method}" in capsys.readouterr().out
    rows = _train_rows(full)
    assert [r["step"] for r in rows] == list(range(1, 5))
    extra = {"nll_loss", "log_odds_ratio", "log_odds_chosen"} if method == "orpo" else set()
    assert all(PAIR_METRICS | extra <= set(r) for r in rows)
    evals = [r for r in read_metrics(full / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4] and evals[0]["eval_pairs"] == 4
    assert {f"eval_{m}" for m in PAIR_METRICS} <= set(evals[-1])
    if method == "dpo":  # the policy starts as the reference: zero rewards, loss log 2
        assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert evals[0]["eval_loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]  # lr 1e-2: it must learn
    if method == "dpo":
        assert rows[-1]["rewards/accuracies"] == 1.0  # ORPO's rewards (mean log-probs) favour the short "No." longer

    cut = tmp_path / "cut"
    assert main(_args(tiny_model_dir, pairs_file, cut, method)) == 0
    shutil.rmtree(cut / "checkpoint-4")  # as if the run had died after step 2's checkpoint
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    resumed = _train_rows(cut)
    assert [r["step"] for r in resumed] == list(range(1, 5))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]  # bit for bit, as SFT resumes
    assert [r["rewards/margins"] for r in resumed] == [r["rewards/margins"] for r in rows]


def test_dpo_same_step_reference_gives_the_same_run_as_the_cached_one(tiny_model_dir, pairs_file, tmp_path):
    runs = {}
    for reference in ("cached", "same-step"):
        out = tmp_path / reference
        assert main(_args(tiny_model_dir, pairs_file, out, "dpo", "--max-steps", "3", "--dpo-reference",
                          reference)) == 0
        runs[reference] = _train_rows(out)
    for a, b in zip(runs["cached"], runs["same-step"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)


def test_preference_data_with_sft_and_sft_data_with_dpo_fail_before_training(
        tiny_model_dir, pairs_file, small_oasst, tmp_path, capsys):
    assert main(_args(tiny_model_dir, pairs_file, tmp_path / "a", "sft")) == 2
    assert "train with --method dpo or orpo" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, small_oasst, tmp_path / "b", "dpo")) == 2
    err = capsys.readouterr().err
    assert "DPO / ORPO train on preference pairs" in err and str(small_oasst) in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
