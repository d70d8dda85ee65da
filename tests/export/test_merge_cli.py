"""``qlorakit merge`` end to end: a tiny base directory + a trained-looking adapter -> a plain checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers

from qlorakit.cli.main import main
from qlorakit.config import LoraConfig, QuantConfig
from qlorakit.lora import lora_layers, save_adapter
from qlorakit.models import load_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def base_dir(shared_dir, save_tiny_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(shared_dir / "models" / "smollm2-135m-instruct"), gguf_file=GGUF)
    return save_tiny_llama("base", tokenizer, vocab_size=len(tokenizer))


def test_merge_cli_writes_a_checkpoint_with_the_adapted_logits(base_dir, tmp_path, capsys):
    model = load_model(base_dir, quant=QuantConfig(), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.3)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--output", str(out),
                 "--dtype", "float32"]) == 0
    assert "merged 14 adapted layers" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer_config.json").is_file()
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err


def test_merge_cli_rejects_a_directory_without_an_adapter(base_dir, tmp_path, capsys):
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "missing adapter_config.json; not a PEFT adapter directory" in capsys.readouterr().err
