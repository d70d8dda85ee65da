"""``qlorakit eval mmlu`` end to end on a tiny model: JSON shape, adapters (one that fits is applied, one
made for another base is refused with a clear message), and inputs checked before loading."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import transformers

from qlorakit.cli.main import main
from qlorakit.config import LoraConfig
from qlorakit.lora import add_lora, lora_layers, save_adapter
from tests.helpers.tiny_llama import tiny_llama_config


def _folder(root, subjects=("astronomy", "sociology")):
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows(
                    [[f"{split} question {i} about {subject}?", "one", "two", "three", "four", "ABCD"[i % 4]]
                     for i in range(5)])
    return root


def _adapter(tmp_path, hidden, vocab, name):
    torch.manual_seed(1)
    config = tiny_llama_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64)
    model = transformers.LlamaForCausalLM(config)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 2.0)
    return save_adapter(model, tmp_path / name)


def _run(args, out):
    code = main(["eval", "mmlu", *args, "--output", str(out), "--no-progress"])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_cli_mmlu_writes_accuracies_as_fractions(tiny_dir, tmp_path, capsys):
    data = _folder(tmp_path / "mmlu")
    code, result = _run(["--model", str(tiny_dir), "--data", str(data), "--shots", "2", "--batch-size", "3"],
                        tmp_path / "r.json")
    assert code == 0
    assert set(result["subjects"]) == {"astronomy", "sociology"}
    assert set(result["categories"]) == {"STEM", "social sciences"}
    assert all(0 <= v <= 1 for v in result["subjects"].values())
    assert result["mean"] == pytest.approx(sum(result["subjects"].values()) / 2)
    assert result["details"]["astronomy"]["total"] == 5 and result["shots"] == 2
    assert "mean over subjects" in capsys.readouterr().out


def test_adapter_that_fits_is_applied(tiny_dir, smol_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A short text to score with and without the adapter. " * 4)
    adapter = _adapter(tmp_path, 32, len(smol_tokenizer), "fits")
    common = ["eval", "ppl", "--model", str(tiny_dir), "--data", str(text), "--no-quantize", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "a.json")]) == 0
    assert main(common + ["--adapter", str(adapter), "--output", str(tmp_path / "b.json")]) == 0
    plain, adapted = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert adapted["adapter"] == str(adapter) and adapted["tokens"] == plain["tokens"]
    assert abs(adapted["nll"] - plain["nll"]) > 1e-3  # B ~ N(0, 2): the adapter moves every logit


def test_adapter_for_another_base_is_refused(tiny_dir, smol_tokenizer, tmp_path, capsys):
    data = _folder(tmp_path / "mmlu")
    other = _adapter(tmp_path, 48, len(smol_tokenizer), "other")
    code, _ = _run(["--model", str(tiny_dir), "--data", str(data), "--adapter", str(other)], tmp_path / "r.json")
    assert code == 2
    err = capsys.readouterr().err
    assert "has shape" in err and "the adapter was made for another base model" in err
    assert not (tmp_path / "r.json").exists()


def test_cli_mmlu_checks_data_and_adapter_before_loading(tmp_path, capsys):
    data = _folder(tmp_path / "mmlu")
    (data / "dev" / "sociology_dev.csv").unlink()
    missing_model = ["--model", str(tmp_path / "no-such-model")]
    assert _run(missing_model + ["--data", str(data)], tmp_path / "r.json")[0] == 2
    assert "sociology_dev.csv: missing few-shot file" in capsys.readouterr().err
    flags = missing_model + ["--data", str(data), "--shots", "0", "--adapter", str(tmp_path)]
    assert _run(flags, tmp_path / "r.json")[0] == 2
    assert "missing adapter_config.json" in capsys.readouterr().err
