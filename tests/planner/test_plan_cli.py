"""``qlorakit plan`` end to end: the paper's shapes, a config.json, the shared SmolLM2, bad input."""

from __future__ import annotations

import json

import pytest

from qlorakit.cli.main import main


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_plan_7b_prints_the_breakdown_and_the_verdict(capsys):
    assert main(["plan", "--model", "7b", "--seq", "512", "--batch", "1", "--r", "64", "--optim", "paged_adamw",
                 "--grad-ckpt", "--gpu-mem", "48GB"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for row in ("weights_4bit", "quant_constants", "embeddings", "norms", "lora_params", "lora_grads",
                "optimizer_state", "activations", "logits", "dequant_workspace", "total"):  # fmt: skip
        assert row in out
    assert "with / without double quant" in out and "with / without checkpointing" in out
    assert "verdict: FITS" in out


def test_plan_json_and_exit_code_when_it_does_not_fit(capsys):
    assert main(["plan", "--model", "65b", "--gpu-mem", "24GB", "--json"]) == 1
    d = _json(capsys)
    parts = [k for k in d if k.endswith("_bytes") and k != "total_bytes"]
    assert sum(d[k] for k in parts) == d["total_bytes"] > 24 * 10**9 and d["fits"] is False


def test_plan_reads_a_config_json(tiny_llama_dir, capsys):
    assert main(["plan", "--model", str(tiny_llama_dir / "config.json"), "--r", "4", "--json"]) == 0
    d = _json(capsys)
    assert d["model"] == str(tiny_llama_dir / "config.json")
    # r (in + out) per adapter, fp32, 2 blocks: q 64+64, k and v 64+32, o 64+64, gate/up/down 64+160
    assert d["lora_params_bytes"] == 4 * 4 * 2 * (128 + 96 + 96 + 128 + 3 * 224)


def test_plan_reads_the_shared_smollm2_directory(shared_dir, capsys):
    model = shared_dir / "models" / "smollm2-135m-instruct"
    assert main(["plan", "--model", str(model), "--device", "cpu", "--seq", "256", "--r", "16", "--json"]) == 0
    d = _json(capsys)
    assert d["settings"]["compute_dtype"] == "auto" and d["framework_bytes"] > 0  # CPU rows present
    assert d["embeddings_bytes"] == 49152 * 576 * 4  # tied: counted once, fp32 on the CPU


@pytest.mark.parametrize("argv,message", [
    (["--model", "7b", "--optim", "sgd"], "unknown optimizer 'sgd'; choose one of adamw"),
    (["--model", "7b", "--gpu-mem", "lots"], "memory size 'lots' is not understood"),
    (["--model", "9b"], "unknown model size '9b'; the LLaMA-1 shapes are 7b, 13b, 33b, 65b"),
    (["--model", "/no/such/config.json"], "does not exist"),
    (["--model", "7b", "--r", "1024", "--optim-budget", "1"], "raise the budget to at least"),
    (["--model", "7b", "--optim", "adamw", "--optim-budget", "64"], "applies to paged optimizers"),
])  # fmt: skip
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
