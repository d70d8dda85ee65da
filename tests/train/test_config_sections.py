"""Config in sections: every flag of the one-section layout still parses, old files load with one deprecation
message, ``config.yaml`` is written in sections, and allowed values and the integer check have one home."""

from __future__ import annotations

import argparse
import warnings

import pytest
import yaml

from qlorakit import constants
from qlorakit.cli.config_args import add_config_flags, dump_yaml, load_config_file, run_config_from_args
from qlorakit.config import MOVED_FROM_TRAIN, SECTIONS, EvalConfig, MemoryConfig, OptimConfig, RunConfig, TrainConfig
from qlorakit.errors import ConfigError

#: Every flag ``qlorakit train`` had before the sections, a value, and where it must land now.
OLD_FLAGS = [
    ("--quant-type", "fp4", "quant.quant_type", "fp4"), ("--quant-blocksize", "128", "quant.blocksize", 128),
    ("--no-double-quant", None, "quant.double_quant", False), ("--lora-r", "8", "lora.r", 8),
    ("--lora-alpha", "4", "lora.alpha", 4.0), ("--lora-dropout", "0.0", "lora.dropout", 0.0),
    ("--lora-targets", "q_proj,v_proj", "lora.targets", ("q_proj", "v_proj")),
    ("--lora-rslora", None, "lora.rslora", True), ("--lora-init", "gaussian", "lora.init", "gaussian"),
    ("--lora-bias", "none", "lora.bias", "none"), ("--data", "a.jsonl", "data.paths", ("a.jsonl",)),
    ("--format", "alpaca", "data.format", "alpaca"), ("--source-max-len", "64", "data.source_max_len", 64),
    ("--target-max-len", "32", "data.target_max_len", 32), ("--max-seq-len", "80", "data.max_seq_len", 80),
    ("--train-on-source", None, "data.train_on_source", True), ("--block-size", "128", "data.block_size", 128),
    ("--no-group-by-length", None, "data.group_by_length", False), ("--val-size", "4", "data.val_size", 4.0),
    ("--data-seed", "7", "data.seed", 7), ("--no-chat-template", None, "data.chat_template", False),
    ("--output-dir", "out", "train.output_dir", "out"), ("--max-steps", "3", "train.max_steps", 3),
    ("--epochs", "2", "train.epochs", 2.0), ("--batch-size", "2", "train.batch_size", 2),
    ("--grad-accum", "4", "train.grad_accum", 4), ("--lr", "0.001", "optim.lr", 0.001),
    ("--scheduler", "cosine", "optim.scheduler", "cosine"), ("--warmup-ratio", "0.1", "optim.warmup_ratio", 0.1),
    ("--weight-decay", "0.01", "optim.weight_decay", 0.01), ("--max-grad-norm", "1.0", "optim.max_grad_norm", 1.0),
    ("--adam-beta1", "0.8", "optim.adam_beta1", 0.8), ("--adam-beta2", "0.99", "optim.adam_beta2", 0.99),
    ("--adam-eps", "1e-6", "optim.adam_eps", 1e-6), ("--optim", "adamw8bit", "optim.optim", "adamw8bit"),
    ("--optim-budget", "0", "optim.optim_budget", 0),
    ("--no-gradient-checkpointing", None, "memory.gradient_checkpointing", False),
    ("--loss-chunk-tokens", "0", "memory.loss_chunk_tokens", 0), ("--no-fuse-lora", None, "memory.fuse_lora", False),
    ("--no-recompute-swiglu", None, "memory.recompute_swiglu", False),
    ("--no-fuse-rmsnorm", None, "memory.fuse_rmsnorm", False),
    ("--malloc-mmap-threshold-kib", "512", "memory.malloc_mmap_threshold_kib", 512), ("--seed", "3", "train.seed", 3),
    ("--save-steps", "5", "train.save_steps", 5), ("--eval-steps", "5", "eval.eval_steps", 5),
    ("--eval-ppl-file", "t.txt", "eval.eval_ppl_file", "t.txt"),
    ("--eval-ppl-max-seq-len", "4096", "eval.eval_ppl_max_seq_len", 4096),
    ("--eval-ppl-stride", "32", "eval.eval_ppl_stride", 32), ("--eval-mmlu-dir", "m", "eval.eval_mmlu_dir", "m"),
    ("--eval-mmlu-shots", "1", "eval.eval_mmlu_shots", 1), ("--eval-mmlu-limit", "0", "eval.eval_mmlu_limit", 0),
    ("--logging-steps", "2", "train.logging_steps", 2), ("--save-total-limit", "0", "train.save_total_limit", 0),
    ("--compute-dtype", "float32", "train.compute_dtype", "float32"),
]


def _parse(argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    return run_config_from_args(parser.parse_args(argv))


def _get(cfg: RunConfig, path: str):
    section, name = path.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize(("flag", "value", "path", "expected"), OLD_FLAGS, ids=[f[0] for f in OLD_FLAGS])
def test_every_old_flag_still_parses_into_its_section(flag, value, path, expected):
    cfg = _parse([flag] if value is None else [flag, value])
    assert _get(cfg, path) == expected


def test_model_flag_still_parses():
    assert _parse(["--model", "some/dir"]).model == "some/dir"


def _old_layout() -> dict:
    return {"lora": {"r": 2}, "train": {"max_steps": 1, "lr": 0.001, "gradient_checkpointing": False,
                                        "eval_steps": 3, "optim": "adamw"}}


def test_old_layout_file_loads_with_one_message_naming_each_moved_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(_old_layout()))
    with pytest.warns(FutureWarning) as caught:
        cfg = _parse(["--config", str(path)])
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1
    for moved in ("train.lr -> optim.lr", "train.gradient_checkpointing -> memory.gradient_checkpointing",
                  "train.eval_steps -> eval.eval_steps", "train.optim -> optim.optim"):
        assert moved in messages[0]
    assert "max_steps" not in messages[0]
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.memory.gradient_checkpointing, cfg.eval.eval_steps) == (
        1, 0.001, False, 3)
    assert cfg.lora.r == 2 and cfg.optim.optim == "adamw"


def test_old_layout_mapping_and_new_layout_build_the_same_config():
    with pytest.warns(FutureWarning, match="train.lr -> optim.lr"):
        old = RunConfig.from_mapping(_old_layout())
    new = {"lora": {"r": 2}, "train": {"max_steps": 1}, "optim": {"lr": 0.001, "optim": "adamw"},
           "memory": {"gradient_checkpointing": False}, "eval": {"eval_steps": 3}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunConfig.from_mapping(new) == old


def test_a_key_in_both_places_fails():
    with pytest.raises(ConfigError, match="'lr' is given under both 'train' and 'optim'"):
        RunConfig.from_mapping({"train": {"lr": 0.1}, "optim": {"lr": 0.2}})


def test_flags_beat_an_old_layout_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(_old_layout()))
    with pytest.warns(FutureWarning):
        cfg = _parse(["--config", str(path), "--lr", "0.5"])
    assert cfg.optim.lr == 0.5


def test_config_yaml_is_written_in_sections_and_reads_back(tmp_path):
    cfg = RunConfig(optim=OptimConfig(lr=0.01), memory=MemoryConfig(fuse_lora=False), eval=EvalConfig(eval_steps=2))
    text = dump_yaml(cfg)
    values = yaml.safe_load(text)
    assert list(values) == ["model", *SECTIONS]
    assert not set(values["train"]) & set(MOVED_FROM_TRAIN)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunConfig.from_mapping(load_config_file(path)) == cfg


def test_allowed_values_live_in_constants():
    import qlorakit.config as config
    import qlorakit.config_fields as config_fields

    for name in ("COMPUTE_DTYPES", "LORA_INITS", "DATA_FORMATS", "SCHEDULERS", "OPTIMIZER_NAMES", "BASE_QUANT_TYPES",
                 "DISTRIBUTED_STRATEGIES", "TRAIN_METHODS", "DPO_REFERENCES"):
        assert getattr(config, name) is getattr(constants, name)
    assert config_fields.REPORT_TARGETS is constants.REPORT_TARGETS  # read by the report_to validator


@pytest.mark.parametrize(("cls", "name", "low"), [
    (TrainConfig, "batch_size", 1), (TrainConfig, "max_steps", 0), (OptimConfig, "optim_budget", 0),
    (MemoryConfig, "loss_chunk_tokens", 0), (EvalConfig, "eval_steps", 0), (EvalConfig, "eval_ppl_stride", 1),
])
def test_integer_fields_refuse_bools_floats_and_small_values(cls, name, low):
    for bad in (True, 1.5, low - 1):
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{name} = "):
            cls(**{name: bad})
