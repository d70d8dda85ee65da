"""``qlorakit inspect``: counts and sizes from the config alone, for directories and GGUF files."""

from __future__ import annotations

import json

import pytest
import transformers

from qlorakit.cli.main import main
from qlorakit.lora.targets import resolve_targets
from qlorakit.models import inspect_source
from qlorakit.quant import bits_per_param
from tests.helpers.tiny_models import tiny_config


def _config_only_dir(tmp_path, arch, **overrides):
    """A model directory with config.json and no weights at all: inspect must not need them."""
    tiny_config(arch, **overrides).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_counts_match_the_transformers_model(tmp_path, arch):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    summary = inspect_source(_config_only_dir(tmp_path, arch))
    targets = resolve_targets(model, "all-linear")
    assert summary.total_params == model.num_parameters()  # a tied head counted once
    assert summary.target_params == sum(model.get_submodule(t).weight.numel() for t in targets)
    embeddings = model.get_input_embeddings().weight.numel() * (1 if summary.tied_embeddings else 2)
    assert summary.embedding_params == embeddings
    assert summary.norm_params == sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert summary.target_modules == dict.fromkeys(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2
    )
    expected_4bit = (
        summary.target_params * bits_per_param() / 8
        + summary.norm_params * 4
        + 2 * (summary.embedding_params + summary.other_params)
    )
    assert summary.bytes_4bit == int(expected_4bit) and summary.bytes_16bit == 2 * summary.total_params


def test_cli_prints_architecture_counts_modules_and_sizes(tmp_path, capsys):
    directory = _config_only_dir(tmp_path, "qwen2")
    assert main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    summary = inspect_source(directory)
    assert "Qwen2ForCausalLM (model_type qwen2)" in out
    assert f"parameters        {summary.total_params:,}" in out
    assert f"in targets      {summary.target_params:,}" in out
    assert (
        "quantized modules 14: q_proj x2, k_proj x2, v_proj x2, o_proj x2, gate_proj x2, up_proj x2, down_proj x2"
        in out
    )
    assert "NF4, block 64, double quant (4.127 bits/param)" in out
    assert "size, 4-bit" in out and "size, 16-bit" in out
    assert summary.other_params == 2 * (64 + 32 + 32)  # Qwen2's q/k/v biases (hidden 64, 2 kv heads x 16)


def test_cli_json_and_format_options(tmp_path, capsys):
    directory = _config_only_dir(tmp_path, "llama")
    assert main(["inspect", str(directory), "--json", "--quant-type", "fp4", "--no-double-quant"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quant_format"] == "FP4, block 64" and data["bits_per_param"] == 4.5
    assert data["kind"] == "safetensors" and data["num_layers"] == 2


def test_bnb_directory_reports_its_saved_format(tmp_path):
    directory = _config_only_dir(tmp_path, "llama")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    summary = inspect_source(directory)
    assert summary.kind == "bnb-4bit" and summary.quant_format == "FP4, block 64"


def test_cli_on_the_smollm2_gguf_reads_metadata_only(smollm2_gguf, capsys):
    assert main(["inspect", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "layers            30   hidden 576   vocab 49152   tied embeddings True" in out
    assert "parameters        134,515,008" in out  # the figure of the model's README
    assert "quantized modules 210" in out
    assert "GGUF tensor types Q4_1 x210, F32 x61, Q8_0 x1" in out


def test_cli_reports_a_bad_source_as_an_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
