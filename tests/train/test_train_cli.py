"""``qlorakit train`` end to end on a tiny model directory: outputs, resume, dry run and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlorakit.cli.main import main
from qlorakit.train import read_metrics


@pytest.fixture(scope="module")
def tiny_model_dir(smol_tokenizer, save_tiny_llama) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer, saved as safetensors."""
    return save_tiny_llama("tiny_llama", smol_tokenizer, vocab_size=len(smol_tokenizer), tie_word_embeddings=True)


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "2", "--lora-r", "4", "--val-size", "4", "--compute-dtype", "float32", "--no-progress",
            "--source-max-len", "64", "--target-max-len", "32", "--lr", "1e-2", "--no-gradient-checkpointing", *extra]


def test_train_writes_the_run_directory_and_resumes_to_the_same_result(tiny_model_dir, small_oasst, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, small_oasst, full, "--max-steps", "6", "--save-steps", "2")) == 0
    out = capsys.readouterr().out
    assert "qlorakit run summary" in out and str(full / "adapter") in out
    written = {p.name for p in full.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "loss.png", "adapter", "checkpoint-4", "checkpoint-6"} <= written
    assert json.loads((full / "adapter" / "adapter_config.json").read_text())["r"] == 4
    rows = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 6 and all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)

    cut = tmp_path / "cut"
    assert main(_args(tiny_model_dir, small_oasst, cut, "--max-steps", "6", "--save-steps", "2")) == 0
    shutil.rmtree(cut / "checkpoint-6")  # as if the run had died after step 4's checkpoint
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert read_metrics(cut / "metrics.jsonl") == [
        {k: v for k, v in r.items()} for r in read_metrics(cut / "metrics.jsonl")]
    def losses(d):
        return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
    assert losses(cut) == losses(full)


def test_dry_run_validates_and_writes_nothing(tiny_model_dir, small_oasst, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(_args(tiny_model_dir, small_oasst, out, "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "10 train / 4 held-out examples" in text and "schedule" in text
    assert not out.exists()


def test_non_empty_output_dir_is_refused_without_overwrite(tiny_model_dir, small_oasst, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_args(tiny_model_dir, small_oasst, out, "--max-steps", "1")) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("case", ["missing", "empty", "wrong-format"])
def test_bad_data_fails_before_training(tiny_model_dir, small_oasst, tmp_path, capsys, case):
    data = {"missing": tmp_path / "nope.jsonl", "empty": tmp_path / "empty.jsonl", "wrong-format": small_oasst}[case]
    if case == "empty":
        data.write_text("")
    extra = ["--format", "dolly"] if case == "wrong-format" else []
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, data, out, "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(data.name) in err
    assert not out.exists()


def test_config_file_sets_fields_and_flags_override_it(tiny_model_dir, small_oasst, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora:\n  r: 2\n  alpha: 4\ntrain:\n  max_steps: 1\noptim:\n  lr: 0.001\n")
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, small_oasst, out, "--config", str(cfg), "--lora-alpha", "8", "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "lora       r 4, alpha 8.0" in text  # --lora-r 4 from _args and --lora-alpha beat the file
    assert "1 steps" in text and "lr 0.01 " in text  # max_steps from the file, --lr 1e-2 (in _args) beats it
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 1\n")
    assert main(_args(tiny_model_dir, small_oasst, out, "--config", str(bad), "--dry-run")) == 2
    assert "unknown field(s) ['learning_rate']" in capsys.readouterr().err


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ["--model", "--data", "--format", "--output-dir", "--max-steps", "--batch-size", "--grad-accum",
                 "--max-seq-len", "--lr", "--lora-r", "--lora-alpha", "--seed", "--save-steps", "--eval-steps",
                 "--val-size", "--resume", "--overwrite", "--config", "--compute-dtype", "--optim", "--optim-budget"]:
        assert flag in text, flag
    assert "(default: 0.0002)" in text and "(default: 64)" in text and "(default: paged_adamw)" in text


def test_allocator_threshold_is_set_before_the_model_loads(tiny_model_dir, small_oasst, tmp_path, monkeypatch):
    """``qlorakit train`` fixes glibc's mmap threshold (the config's value) before ``load_model`` runs."""
    import qlorakit.models
    import qlorakit.train.allocator

    calls: list[tuple[str, object]] = []

    class Stop(Exception):
        pass

    def fake_load_model(*args, **kwargs):
        calls.append(("load_model", None))
        raise Stop

    monkeypatch.setattr(qlorakit.train.allocator, "fix_mmap_threshold", lambda kib: calls.append(("threshold", kib)))
    monkeypatch.setattr(qlorakit.models, "load_model", fake_load_model)
    with pytest.raises(Stop):
        main(_args(tiny_model_dir, small_oasst, tmp_path / "out", "--max-steps", "1",
                   "--malloc-mmap-threshold-kib", "512"))
    assert calls == [("threshold", 512), ("load_model", None)]


def test_resume_of_a_run_whose_config_yaml_has_the_old_layout(tiny_model_dir, small_oasst, tmp_path, capsys):
    """A run directory written before the config had sections (optim/memory/eval keys under ``train:``) resumes."""
    import yaml

    from qlorakit.config import MOVED_FROM_TRAIN

    run = tmp_path / "run"
    assert main(_args(tiny_model_dir, small_oasst, run, "--max-steps", "4", "--save-steps", "2")) == 0
    values = yaml.safe_load((run / "config.yaml").read_text())
    assert {"optim", "memory", "eval"} <= set(values) and not set(values["train"]) & set(MOVED_FROM_TRAIN)
    def losses(d):
        return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
    full = losses(run)
    old = {k: v for k, v in values.items() if k not in ("optim", "memory", "eval")}
    old["train"] = {**values["train"], **values["optim"], **values["memory"], **values["eval"]}
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    shutil.rmtree(run / "checkpoint-4")
    with pytest.warns(FutureWarning, match=r"train\.lr -> optim\.lr"):
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert losses(run) == full
