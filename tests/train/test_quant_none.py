"""``quant_type none``: LoRA on the unquantized base, through train, resume, merge, generate and plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from qlorakit.cli.main import main
from qlorakit.config import LoraConfig, QuantConfig
from qlorakit.errors import ConfigError
from qlorakit.lora import lora_layers
from qlorakit.models import load_model
from qlorakit.quant.linear import Linear4bit
from qlorakit.train import read_metrics


@pytest.fixture(scope="module")
def tiny_model_dir(smol_tokenizer, save_tiny_llama) -> Path:
    return save_tiny_llama("tiny_llama_none", smol_tokenizer, vocab_size=len(smol_tokenizer), tie_word_embeddings=True)


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "4", "--val-size", "4", "--compute-dtype", "float32", "--no-progress",
            "--source-max-len", "64", "--target-max-len", "32", "--lr", "1e-2", "--quant-type", "none",
            "--max-steps", "4", "--save-steps", "2", *extra]


def test_quant_config_accepts_none_and_still_rejects_unknown_types():
    assert not QuantConfig(quant_type="none").quantized and QuantConfig().quantized
    with pytest.raises(ConfigError, match="quant_type"):
        QuantConfig(quant_type="nf8")


def test_lora_on_the_unquantized_base_equals_the_reference_with_the_plain_weights(tiny_model_dir):
    model = load_model(tiny_model_dir, quant=QuantConfig(quant_type="none"), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    layers = lora_layers(model)
    assert layers and all(type(layer.base_layer) is nn.Linear for layer in layers.values())
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.2)
    # reference: transformers' own model from the same files, each adapted weight replaced by W + (alpha/r) B A
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for path, layer in layers.items():
            delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # (out, r) @ (r, in)
            reference.get_submodule(path).weight += delta
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_train_resume_merge_generate_with_quant_type_none(tiny_model_dir, smol_tokenizer, small_oasst, tmp_path,
                                                          capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_train_args(tiny_model_dir, small_oasst, full)) == 0
    assert "(none, blocksize" in capsys.readouterr().out
    assert "quant_type: none" in (full / "config.yaml").read_text()
    assert main(_train_args(tiny_model_dir, small_oasst, cut)) == 0
    shutil.rmtree(cut / "checkpoint-4")
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0

    def losses(d):
        return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
    assert len(losses(full)) == 4 and losses(cut) == losses(full)

    adapter, merged_dir = full / "adapter", tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(merged_dir),
                 "--dtype", "float32", "--quant-type", "none"]) == 0
    from qlorakit.lora import load_adapter

    trained = load_model(tiny_model_dir, quant=QuantConfig(quant_type="none"))
    load_adapter(trained, adapter)
    trained.eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        want = trained(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(want, load_model(tiny_model_dir, quant=QuantConfig(quant_type="none"))(ids).logits)

    capsys.readouterr()
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", f"a={adapter}", "--prompt", "Hello there",
                 "--max-new-tokens", "5", "--quant-type", "none", "--chat-template", "off", "--output", str(out),
                 "--allow-other-base"]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["adapter"] == "a" and 1 <= len(row["token_ids"]) <= 5
    seq = torch.tensor([smol_tokenizer("Hello there")["input_ids"]])
    assert seq.shape[1] == row["prompt_tokens"]
    with torch.no_grad():  # greedy: each new token is the argmax of the adapted unquantized model
        for token in row["token_ids"]:
            assert int(trained(seq).logits[0, -1].argmax()) == token
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)


def test_plan_with_quant_type_none_counts_the_base_in_the_compute_dtype(tiny_model_dir, capsys):
    def plan(*extra):
        assert main(["plan", "--model", str(tiny_model_dir), "--json", "--device", "cpu", *extra]) in (0, 1)
        return json.loads(capsys.readouterr().out)

    nf4, none = plan(), plan("--quant-type", "none")
    assert "weights_4bit_bytes" in nf4 and "weights_4bit_bytes" not in none
    assert none["quant_constants_bytes"] == 0 and none["dequant_workspace_bytes"] == 0
    assert none["base_weights_bytes"] == pytest.approx(8 * nf4["weights_4bit_bytes"], rel=0.01)  # fp32 vs 4 bits
    assert none["total_bytes"] > nf4["total_bytes"]
