"""Full fine-tuning (``train.finetune: full``): every weight of an unquantized model trains.

The QLoRA paper's baseline beside 16-bit LoRA (its Figure 2 and Table 3 compare against full fine-tuning).
What trains: every floating-point parameter of the model, that is the input embedding, every linear of the
decoder blocks, every norm weight and the output head; a head tied to the input embedding is one parameter
(one tensor, one gradient, one optimizer state, saved once under the embedding's name). Buffers (rotary
``inv_freq``) are not parameters and stay as they are. The update is the loop's usual AdamW step on
``theta`` instead of on ``A, B``:

    theta <- theta - lr (m_hat / (sqrt(v_hat) + eps) + wd theta)     for every parameter theta

Memory: per trained value 4 bytes of weight + 4 of gradient + 8 of AdamW state (fp32; 16 bytes, 2.2 GB for
SmolLM2-135M), against about 0.5 byte of 4-bit weight plus the small adapters with QLoRA.

Refused (``config.check_full_finetune``, when the config is built): a 4-bit base (packed weights have no
gradient), 16-bit weights (no fp32 master copy: AdamW's small updates would round away), DPO / ORPO (their
reference is the base with the adapters off) and FSDP (it shards the 4-bit base and adapters only).

``prepare(model)`` is the caller's step (as ``add_lora`` is for LoRA; ``qlorakit train`` calls it after
loading): it refuses LoRA layers and 4-bit linears and sets ``requires_grad`` on every parameter.
``train()`` checks ``check_prepared`` before its first step. Checkpoints hold the trained weights as
``model.safetensors`` (``trainable_tensors``; Hugging Face names) instead of ``adapter/``; the end of a run
writes a whole model directory (``qlorakit train`` uses ``models.export.merge_and_export``, the writer of
``qlorakit merge``), which ``load_model`` and transformers read back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlorakit.errors import ConfigError, StateDictError
from qlorakit.lora.layer import LoraLinear
from qlorakit.quant.linear import Linear4bit

#: The trained weights inside a full fine-tuning checkpoint.
WEIGHTS_FILE = "model.safetensors"


def _refuse_frozen_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            raise ConfigError(f"full fine-tuning trains the model's own weights, but {name} is a LoRA layer; load the "
                              "model without adapters (lora=None), or train with --finetune lora")
        if isinstance(module, Linear4bit):
            raise ConfigError(f"full fine-tuning needs an unquantized model, but {name} is a 4-bit Linear4bit (frozen "
                              "packed storage); load it with --quant-type none")


def prepare(model: nn.Module) -> int:
    """Make every floating-point parameter of ``model`` trainable; returns how many values train (a tied head
    counted once). Raises ``ConfigError`` on LoRA layers or 4-bit linears."""
    _refuse_frozen_layers(model)
    count = 0
    for param in model.parameters():  # deduplicated: a tied head is the embedding's parameter
        if param.is_floating_point():
            param.requires_grad_(True)
            count += param.numel()
    if not count:
        raise ConfigError("full fine-tuning: the model has no floating-point parameters to train")
    return count


def check_prepared(model: nn.Module) -> None:
    """Before the first step of a full fine-tuning run: no LoRA / 4-bit layer, every parameter trainable."""
    _refuse_frozen_layers(model)
    frozen = [name for name, p in model.named_parameters() if p.is_floating_point() and not p.requires_grad]
    if frozen:
        raise ConfigError(f"train.finetune = 'full' but {len(frozen)} parameter(s) are frozen, e.g. {frozen[:3]}; "
                          "call qlorakit.train.full.prepare(model) before train()")


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters under their (first) names, detached, contiguous, on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    """``trainable_tensors`` as one safetensors file (the checkpoint's ``model.safetensors``)."""
    save_file(trainable_tensors(model), str(path), metadata={"format": "pt"})


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the weights of ``path`` into ``model``'s trainable parameters; the names, shapes and dtypes must be
    exactly the trainable ones (a checkpoint of another model or of a LoRA run is refused before any copy)."""
    tensors = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise StateDictError(f"{path}: the saved weights do not match the model being trained (missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}); resume with the run's own model and "
                             "config.yaml")
    for name, param in params.items():
        saved = tensors[name]
        if saved.shape != param.shape or saved.dtype != param.dtype:
            raise StateDictError(f"{path}: {name} is {tuple(saved.shape)} {saved.dtype}, the model's is "
                                 f"{tuple(param.shape)} {param.dtype}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
