"""``--finetune full``: every weight trains; checkpoints, resume, the final model directory and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from qlorakit.cli.main import main
from qlorakit.config import LoraConfig, QuantConfig, RunConfig
from qlorakit.errors import ConfigError, StateDictError
from qlorakit.models import load_model
from qlorakit.train import full, read_metrics
from qlorakit.train.checkpoint import load_checkpoint
from qlorakit.train.optimizer import build_optimizer

NONE = QuantConfig(quant_type="none")


@pytest.fixture(scope="module")
def tiny_model_dir(smol_tokenizer, save_tiny_llama) -> Path:
    return save_tiny_llama("tiny_llama_full", smol_tokenizer, vocab_size=len(smol_tokenizer), tie_word_embeddings=True)


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "1", "--val-size", "4", "--no-progress", "--source-max-len", "64",
            "--target-max-len", "32", "--lr", "1e-3", "--quant-type", "none", "--finetune", "full",
            "--max-steps", "4", "--save-steps", "2", "--memory-budget", "64GB", *extra]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]


def test_prepare_trains_every_parameter_once_with_a_tied_head(tiny_model_dir):
    model = load_model(tiny_model_dir, quant=NONE)
    assert not any(p.requires_grad for p in model.parameters())  # the loader freezes everything
    count = full.prepare(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one parameter
    assert count == sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in
                                                                      full.trainable_tensors(model).values())
    names = set(full.trainable_tensors(model))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert {"model.norm.weight", "model.layers.0.mlp.down_proj.weight"} <= names
    full.check_prepared(model)


def test_prepare_refuses_lora_layers_and_4bit_linears(tiny_model_dir):
    with pytest.raises(ConfigError, match="LoRA layer"):
        full.prepare(load_model(tiny_model_dir, quant=NONE, lora=LoraConfig(r=2)))
    with pytest.raises(ConfigError, match="Linear4bit"):
        full.prepare(load_model(tiny_model_dir))  # nf4 by default
    model = load_model(tiny_model_dir, quant=NONE)
    with pytest.raises(ConfigError, match="frozen"):
        full.check_prepared(model)


@pytest.mark.parametrize(("sections", "match"), [
    ({}, "quant_type = 'nf4'"),
    ({"quant": {"quant_type": "none"}, "train": {"compute_dtype": "bfloat16"}}, "compute_dtype"),
    ({"quant": {"quant_type": "none"}, "objective": {"method": "dpo"}}, "needs LoRA"),
    ({"quant": {"quant_type": "none"}, "parallel": {"distributed": "fsdp"}}, "fsdp"),
])
def test_config_refuses_what_full_finetuning_cannot_do(sections, match):
    values = {**sections, "train": {"finetune": "full", **sections.get("train", {})}}
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(values)


def test_config_full_finetuning_computes_in_fp32_and_lora_stays_the_default():
    assert RunConfig().train.finetune == "lora" and not RunConfig().full_finetune
    cfg = RunConfig.from_mapping({"quant": {"quant_type": "none"}, "train": {"finetune": "full"}})
    assert cfg.full_finetune and cfg.train.compute_dtype == "float32"
    with pytest.raises(ConfigError, match="finetune"):
        RunConfig.from_mapping({"train": {"finetune": "everything"}})


def test_cli_refuses_a_4bit_base_before_loading_weights(tmp_path, small_oasst, capsys):
    # the model path does not exist: the config error comes first, before any model is looked at
    args = _train_args(tmp_path / "no-such-model", small_oasst, tmp_path / "run")
    args[args.index("--quant-type") + 1] = "nf4"
    assert main(args) == 2
    assert "--quant-type none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_full_run_changes_every_weight_lowers_the_loss_and_writes_a_loadable_model(tiny_model_dir, small_oasst,
                                                                                   smol_tokenizer, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, small_oasst, run)) == 0
    out = capsys.readouterr().out
    assert "finetune   full" in out and "finetune: full" in (run / "config.yaml").read_text()
    assert "compute_dtype: float32" in (run / "config.yaml").read_text()
    evals = _eval_losses(run)
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.05  # held-out loss before and after the 4 steps
    assert not (run / "adapter").exists()
    ckpt = run / "checkpoint-4"
    assert (ckpt / full.WEIGHTS_FILE).is_file() and not (ckpt / "adapter").exists()
    model_dir = run / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer_config.json").is_file()

    base = load_model(tiny_model_dir, quant=NONE)
    trained = load_model(model_dir, quant=NONE)  # qlorakit reads its own output back
    for name, p in base.named_parameters():
        assert not torch.equal(p, trained.get_parameter(name)), f"{name} did not train"
    saved = dict(trained.named_parameters())  # loaded frozen; a tied head under the embedding's name
    from safetensors.torch import load_file

    in_ckpt = load_file(str(ckpt / full.WEIGHTS_FILE))  # the last checkpoint and the final model agree
    assert set(in_ckpt) == set(saved) and all(torch.equal(in_ckpt[k], saved[k]) for k in saved)
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).logits, reference(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(trained(ids).logits, base(ids).logits)

    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(model_dir), "--output",
                 str(tmp_path / "merged")]) == 2  # a whole model is not an adapter: nothing to merge
    assert "use it as --model" in capsys.readouterr().err

    gen = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "4",
                 "--quant-type", "none", "--chat-template", "off", "--output", str(gen)]) == 0
    row = json.loads(gen.read_text().splitlines()[0])
    assert 1 <= len(row["token_ids"]) <= 4
    seq = torch.tensor([smol_tokenizer("Hello there")["input_ids"]])
    with torch.no_grad():  # greedy: each new token is the argmax of the trained model
        for token in row["token_ids"]:
            assert int(trained(seq).logits[0, -1].argmax()) == token
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)


def test_interrupted_and_resumed_full_run_repeats_the_uninterrupted_losses(tiny_model_dir, small_oasst, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_train_args(tiny_model_dir, small_oasst, whole)) == 0
    assert main(_train_args(tiny_model_dir, small_oasst, cut)) == 0
    shutil.rmtree(cut / "checkpoint-4")
    shutil.rmtree(cut / "model")
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert len(_losses(whole)) == 4 and _losses(cut) == _losses(whole)
    assert _eval_losses(cut) == _eval_losses(whole)
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (whole, cut))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_checkpoint_is_refused_by_a_full_run_and_the_reverse(tiny_model_dir, small_oasst, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, small_oasst, run, "--max-steps", "2")) == 0
    lora_model = load_model(tiny_model_dir, quant=NONE, lora=LoraConfig(r=2))
    cfg = RunConfig.from_mapping({"quant": {"quant_type": "none"}})
    with pytest.raises(StateDictError, match="full fine-tuning run's"):
        load_checkpoint(run / "checkpoint-2", lora_model, build_optimizer(lora_model, cfg))


def test_every_weight_gradient_of_the_fast_step_equals_the_reference_step(tiny_model_dir):
    """The memory fast paths (chunked head + loss, fused RMSNorm, SwiGLU recompute, checkpointing) against their
    references, on the gradients full fine-tuning adds (norm weights, the tied head/embedding, every linear).
    Tolerance: normwise relative 1e-5, the fused RMSNorm's documented whole-model bound (fp32 rounding)."""
    from qlorakit.train import rewrites
    from qlorakit.train.loss import token_loss_sum
    from tests.helpers.train import run_config

    model = load_model(tiny_model_dir, quant=NONE)
    full.prepare(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :5] = -100  # answers only
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    grads = []
    for fast in (True, False):
        flags = {"gradient_checkpointing": fast, "fuse_rmsnorm": fast, "recompute_swiglu": fast,
                 "loss_chunk_tokens": 8 if fast else 0}
        cfg = run_config(Path("unused.jsonl"), Path("unused"), **flags)
        cfg = dataclasses.replace(cfg, quant=NONE, train=dataclasses.replace(cfg.train, finetune="full"))
        model.zero_grad(set_to_none=True)
        model.train()
        with rewrites.apply(model, cfg):
            loss, _ = token_loss_sum(model, batch, cfg.memory.loss_chunk_tokens)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert set(grads[0]) == set(grads[1]) and "model.norm.weight" in grads[0]
    for name, want in grads[1].items():
        got = grads[0][name]
        assert float((got - want).norm() / want.norm()) < 1e-5, name
