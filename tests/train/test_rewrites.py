"""The table of training rewrites: every row applied inside ``apply``, the undoable ones undone on exit, all logged."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qlorakit.lora.fused import SharedInputA
from qlorakit.lora.layer import LoraLinear
from qlorakit.quant.linear import Linear4bit
from qlorakit.train import rewrites
from qlorakit.train.rewrites import AT_LOAD, PROCESS, REWRITES, REWRITES_FILE, UNDONE
from tests.helpers.train import run_config, tiny_qlora_model


def _snapshot(model) -> dict:
    """Everything a rewrite may change, as plain values."""
    return {
        "forwards": sorted(name for name, m in model.named_modules() if "forward" in vars(m)),
        "lora_A": sorted(type(a).__name__ for m in model.modules() if isinstance(m, LoraLinear)
                         for a in m.lora_A.values()),
        "switches": [(n, {k: v for k, v in vars(m).items()
                          if k in ("fuse_up_projection", "use_gemv", "reuse_dequant_buffer")})
                     for n, m in model.named_modules() if isinstance(m, (LoraLinear, Linear4bit))],
        "checkpointing": model.is_activation_checkpointing,
        "use_cache": model.config.use_cache,
    }


def test_every_row_names_its_flag_and_lifetime():
    cfg = run_config("data.jsonl", "out")
    assert len({r.name for r in REWRITES}) == len(REWRITES)
    assert {r.lifetime for r in REWRITES} == {UNDONE, PROCESS, AT_LOAD}
    for r in REWRITES:
        assert r.does and (r.flag is None or rewrites.flag_value(cfg, r.flag) is not None)
        assert (r.enter is None) == (r.lifetime == AT_LOAD)


def test_apply_rewrites_the_model_and_exit_restores_it(smol_tokenizer, tmp_path):
    cfg = run_config(tmp_path / "data.jsonl", tmp_path / "run", gradient_checkpointing=True)
    # the paper's (and the quickstart's) dropout 0.05: the groups fuse with one mask each (lora/fused.py)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.05),
                              memory=dataclasses.replace(cfg.memory, use_gemv=False))
    model = tiny_qlora_model(len(smol_tokenizer), cfg.lora)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.compute_dtype = torch.float32  # the input's dtype, so the shared-input groups fuse
    before = _snapshot(model)
    with rewrites.apply(model, cfg) as applied:
        inside = _snapshot(model)
        assert inside["checkpointing"] and inside["use_cache"] is False
        assert "SharedInputA" in inside["lora_A"] and any(isinstance(m, SharedInputA) for m in model.modules())
        assert len(inside["forwards"]) == 2 + 5  # 2 SwiGLU MLPs, 5 RMSNorms (2 per block + final)
        assert all(m.use_gemv is False for m in model.modules() if isinstance(m, Linear4bit))
        assert [r["name"] for r in applied.records] == [r.name for r in REWRITES]
        fusion = next(r for r in applied.records if r["name"] == "shared_input_fusion")
        assert fusion["applied"] == "4 groups"  # q/k/v and gate/up of 2 blocks
    assert _snapshot(model) == before


def test_checkpoint_blocks_recompute_the_first_blocks_and_the_others_rebuild(smol_tokenizer, tmp_path):
    from qlorakit.train.rebuild import decoder_layers

    cfg = run_config(tmp_path / "data.jsonl", tmp_path / "run", gradient_checkpointing=True, checkpoint_blocks=1)
    model = tiny_qlora_model(len(smol_tokenizer), cfg.lora)
    before = _snapshot(model)
    layers = decoder_layers(model)
    with rewrites.apply(model, cfg) as applied:
        assert [layer.gradient_checkpointing for layer in layers] == [True, False]
        assert ["forward" in vars(layer) for layer in layers] == [False, True]  # the rebuild scope: block 2 only
        records = {r["name"]: r["applied"] for r in applied.records}
        assert records["gradient_checkpointing"] == "on for the first 1 of 2 blocks"
        assert records["rebuild_adapter_inputs"] == "1 blocks"
    assert _snapshot(model) == before
    every = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, checkpoint_blocks=5))  # more: all
    with rewrites.apply(model, every) as applied:
        assert [layer.gradient_checkpointing for layer in layers] == [True, True]
        records = {r["name"]: r["applied"] for r in applied.records}
        assert records["gradient_checkpointing"] == "on"
        assert records["rebuild_adapter_inputs"] == "off (checkpointing on)"


def test_apply_undoes_what_it_did_when_a_row_fails(smol_tokenizer, tmp_path, monkeypatch):
    cfg = run_config(tmp_path / "data.jsonl", tmp_path / "run", gradient_checkpointing=True)
    model = tiny_qlora_model(len(smol_tokenizer), cfg.lora)
    before = _snapshot(model)

    def boom(model, cfg):
        raise RuntimeError("row failed")

    last = dataclasses.replace(REWRITES[-2], enter=boom)
    monkeypatch.setattr(rewrites, "REWRITES", (*REWRITES[:-2], last))
    with pytest.raises(RuntimeError, match="row failed"):
        rewrites.apply(model, cfg)
    assert _snapshot(model) == before


def test_report_prints_one_line_per_rewrite_and_writes_the_list(smol_tokenizer, tmp_path, capsys):
    cfg = run_config(tmp_path / "data.jsonl", tmp_path / "run", fuse_rmsnorm=False)
    model = tiny_qlora_model(len(smol_tokenizer), cfg.lora)
    with rewrites.apply(model, cfg) as applied:
        applied.report(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rewrite ")]
    assert len(lines) == len(REWRITES)
    records = json.loads((tmp_path / REWRITES_FILE).read_text())
    assert [r["name"] for r in records] == [r.name for r in REWRITES]
    by_name = {r["name"]: r for r in records}
    assert by_name["fused_rmsnorm"]["value"] is False and by_name["fused_rmsnorm"]["applied"] == "0 norms"
    assert by_name["malloc_mmap_threshold"]["lifetime"] == PROCESS
    assert by_name["norm_output_dtype"]["applied"] == "not applied (fp32 compute)"
