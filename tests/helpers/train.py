"""Helpers for trainer tests: a tiny 4-bit Llama with LoRA, and a small run config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qlorakit.config import SECTIONS, DataConfig, LoraConfig, QuantConfig, RunConfig
from qlorakit.lora import add_lora
from qlorakit.models import quantize_model
from tests.helpers.tiny_llama import tiny_llama_config


def tiny_qlora_model(vocab_size: int, lora: LoraConfig, seed: int = 0) -> nn.Module:
    """A 2-layer random Llama whose block linears are NF4 Linear4bit with LoRA (the shape of a real run)."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=vocab_size, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    quantize_model(model)
    add_lora(model, lora)
    return model


def run_config(data_path: Path, out: Path, packing: bool = False, **fields) -> RunConfig:
    """A small run; ``fields`` are fields of the train/optim/memory/eval sections, each put in its own.

    ``packing`` is off unless asked: most trainer tests pin the unpacked stream (examples per micro-batch);
    tests/train/test_packing.py runs the packed one."""
    base = {"output_dir": str(out), "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "max_steps": 6,
            "gradient_checkpointing": False, "compute_dtype": "float32", "warmup_ratio": 0.2, "scheduler": "cosine"}
    base.update(fields)
    loop_sections = {name: SECTIONS[name] for name in ("train", "optim", "memory", "eval")}
    sections = {name: cls(**{k: v for k, v in base.items() if k in cls.__dataclass_fields__})
                for name, cls in loop_sections.items()}
    assert set(base) <= {f for cls in loop_sections.values() for f in cls.__dataclass_fields__}, base
    return RunConfig(
        model="tiny",
        quant=QuantConfig(),
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),
        data=DataConfig(paths=(str(data_path),), source_max_len=64, target_max_len=32, val_size=4, packing=packing),
        **sections,
    )
