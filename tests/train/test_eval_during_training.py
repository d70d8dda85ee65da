"""Perplexity and MMLU during training: rows in metrics.jsonl at the evaluation steps, values equal to the
standalone evaluations of the trained model, and bad evaluation inputs refused before training."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from qlorakit.cli.main import main
from qlorakit.config import EvalConfig
from qlorakit.data import build_datasets, collate_fn
from qlorakit.errors import ConfigError, DataError
from qlorakit.eval import mmlu, perplexity
from qlorakit.eval.during_training import build_training_evaluator
from qlorakit.train import read_metrics, train
from tests.helpers.train import run_config, tiny_qlora_model


def _mmlu_folder(root):
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        for subject in ("anatomy", "sociology"):
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows(
                    [[f"{split} {i}: which {subject} word?", "alpha", "beta", "gamma", "delta", "ABCD"[i % 4]]
                     for i in range(4)])
    return root


def _text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("Held-out prose for the perplexity check during training. " * 6)
    return path


def test_trainer_logs_perplexity_and_mmlu_rows_equal_to_standalone_evaluation(smol_tokenizer, small_oasst, tmp_path):
    cfg = run_config(small_oasst, tmp_path / "run", max_steps=4, eval_steps=2, eval_ppl_file=str(_text(tmp_path)),
                     eval_ppl_max_seq_len=32, eval_ppl_stride=16, eval_mmlu_dir=str(_mmlu_folder(tmp_path / "mmlu")),
                     eval_mmlu_shots=1, eval_mmlu_limit=3)
    train_set, val_set, _ = build_datasets(cfg.data, smol_tokenizer)
    model = tiny_qlora_model(len(smol_tokenizer), cfg.lora)
    evaluator = build_training_evaluator(cfg.eval, smol_tokenizer, cfg.train.batch_size)
    train(model, train_set, val_set, collate_fn(smol_tokenizer), cfg, tmp_path / "run", progress=False,
          evaluator=evaluator)

    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_ppl" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(set(r) == {"step", "eval_ppl", "eval_ppl_tokens", "mmlu_mean", "mmlu_questions"} for r in rows)
    assert rows[0]["eval_ppl"] != rows[1]["eval_ppl"]  # the adapter moved between the two evaluations
    assert model.training  # restored after each evaluation

    model.eval()
    ids = smol_tokenizer(_text(tmp_path).read_text())["input_ids"]
    final = perplexity.perplexity(model, ids, 32, 16, progress=False)
    assert (rows[1]["eval_ppl"] == pytest.approx(final.perplexity, rel=1e-6)
            and rows[1]["eval_ppl_tokens"] == final.tokens)
    standalone = mmlu.evaluate_mmlu(model, smol_tokenizer, tmp_path / "mmlu", shots=1, limit=3, progress=False)
    assert rows[1]["mmlu_mean"] == pytest.approx(standalone.mean) and rows[1]["mmlu_questions"] == 6


def test_no_evaluation_fields_means_no_evaluator(smol_tokenizer):
    assert build_training_evaluator(EvalConfig(), smol_tokenizer) is None


def test_missing_or_malformed_evaluation_inputs_fail_before_training(smol_tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such text file"):
        build_training_evaluator(EvalConfig(eval_ppl_file=str(tmp_path / "nope.txt")), smol_tokenizer)
    folder = _mmlu_folder(tmp_path / "mmlu")
    (folder / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,Z\n")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: row 1: answer 'Z'"):
        build_training_evaluator(EvalConfig(eval_mmlu_dir=str(folder), eval_mmlu_shots=1), smol_tokenizer)
    with pytest.raises(DataError, match=r"anatomy_dev\.csv: 4 examples, fewer than the 5 few-shot examples"):
        build_training_evaluator(EvalConfig(eval_mmlu_dir=str(_mmlu_folder(tmp_path / "m2"))), smol_tokenizer)


def test_evaluation_fields_are_validated():
    with pytest.raises(ConfigError, match="eval_ppl_stride"):
        EvalConfig(eval_ppl_max_seq_len=64, eval_ppl_stride=128)
    with pytest.raises(ConfigError, match="eval_mmlu_limit"):
        EvalConfig(eval_mmlu_limit=-1)
    assert dataclasses.fields(EvalConfig)  # every field documented for --help
    assert all(f.metadata.get("help") for f in dataclasses.fields(EvalConfig) if f.name.startswith("eval_"))


def test_train_cli_checks_evaluation_inputs_in_a_dry_run(small_oasst, tmp_path, capsys, shared_dir):
    model = shared_dir / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    args = ["train", "--model", str(model), "--data", str(small_oasst), "--output-dir", str(tmp_path / "out"),
            "--dry-run", "--max-steps", "2", "--eval-mmlu-dir", str(tmp_path / "missing")]
    assert main(args) == 2
    assert "no test/ folder" in capsys.readouterr().err
