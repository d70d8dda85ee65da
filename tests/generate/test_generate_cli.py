"""``qlorakit generate`` end to end on the shared SmolLM2 (one model load), and its input errors (no load)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qlorakit.cli.main import main

SMOL = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def _write_adapter(directory, base_name, hidden=576, r=2):
    """A small random PEFT adapter on layer 0's q_proj (shapes of SmolLM2 unless ``hidden`` says otherwise)."""
    directory.mkdir()
    generator = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(r, hidden, generator=generator),
               f"{prefix}.lora_B.weight": torch.randn(hidden, r, generator=generator)},
              str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": ["q_proj"], "base_model_name_or_path": base_name}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_generate_streams_base_and_adapter_requests(shared_dir, tmp_path, capsys):
    adapter = _write_adapter(tmp_path / "smol-q", "HuggingFaceTB/SmolLM2-135M-Instruct")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION, "adapter": "base"}) + "\n\n"
                       + json.dumps({"turns": [QUESTION, "second turn unused"]}) + "\n")
    output = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(shared_dir / SMOL), "--adapter", str(adapter), "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--output", str(output)])
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["adapter"] for r in rows] == ["base", "smol-q"]
    # The NF4 greedy answer that transformers + bitsandbytes also give (shared model README).
    assert rows[0]["text"] == "The capital of France is Paris"
    assert rows[1]["text"] != rows[0]["text"] and len(rows[1]["token_ids"]) == 6
    stdout = capsys.readouterr().out
    assert stdout.startswith("The capital of France is Paris\n") and rows[1]["text"] in stdout


def test_adapter_for_another_base_fails_before_loading(shared_dir, tmp_path, capsys):
    adapter = _write_adapter(tmp_path / "llama", "meta-llama/Llama-2-7b-hf", hidden=4096)
    code = main(["generate", "--model", str(shared_dir / SMOL), "--adapter", f"l={adapter}", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Llama-2-7b-hf" in err and "another base model" in err


@pytest.mark.parametrize("row,message", [
    ('{"prompt": 3}', "prompts.jsonl:2: field 'prompt' must be a non-empty string"),
    ('{"text": "x"}', "prompts.jsonl:2: no 'prompt'"),
    ('{"prompt": "x", "adapter": "nope"}', "adapter 'nope' is not loaded"),
    ("not json", "prompts.jsonl:2: not valid JSON"),
])
def test_bad_prompt_rows_fail_with_file_line_and_field(tmp_path, capsys, row, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + row + "\n")
    code = main(["generate", "--model", "does-not-matter", "--prompts", str(prompts)])
    assert code == 2 and message in capsys.readouterr().err


def test_no_prompt_and_bad_settings_are_refused(capsys):
    assert main(["generate", "--model", "m"]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["generate", "--model", "m", "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
