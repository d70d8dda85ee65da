"""``load_model``: any Hugging Face causal LM, its decoder linears in 4 bits, built without a full-size copy.

Steps (QLoRA section 3: the frozen base is stored in NF4 with double quantization, computed in 16/32 bit):

1. resolve the source (``models.source``) and read only its config and checkpoint headers, so bad input
   fails before any weight is read;
2. build the transformers model on the meta device (``models.meta``) and replace the ``all-linear``
   targets by empty ``Linear4bit`` shells (``models.build``);
3. stream the tensors one by one — safetensors shards or GGUF tensors — quantizing each target weight as
   it arrives (``models.fill``); norms are kept in fp32, embeddings / ``lm_head`` in ``compute_dtype``;
4. tie the embeddings, fail on anything still missing, freeze, and add LoRA adapters if asked.

Peak memory is about the final model plus the one tensor being converted.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from qlorakit.config import LoraConfig, QuantConfig
from qlorakit.errors import ModelLoadError
from qlorakit.lora.targets import resolve_targets
from qlorakit.models.build import (
    build_empty_model,
    keep_norm_outputs_in_input_dtype,
    load_config,
    norm_parameter_names,
    patch_targets,
)
from qlorakit.models.checkpoint import open_checkpoint
from qlorakit.models.fill import NO_HOOKS, Filler, FillHooks, missing_names, prequantized_layers
from qlorakit.models.gguf import GgufTensorStream, check_tensor_types, config_from_dict, gguf_config_dict
from qlorakit.models.gguf_reader import read_gguf_header
from qlorakit.models.source import BNB_4BIT, GGUF, ModelSource, resolve_source

#: The paper's storage format: NF4, block 64, double quantization (``QuantConfig`` is frozen).
DEFAULT_QUANT = QuantConfig()


def load_model(
    source: str | os.PathLike | ModelSource,
    quant: QuantConfig | None = DEFAULT_QUANT,
    lora: LoraConfig | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    hooks: FillHooks = NO_HOOKS,
) -> Any:
    """Load ``source`` as a frozen ``transformers.PreTrainedModel`` in eval mode.

    ``quant``: the 4-bit format of the decoder-block linears (``None`` or ``quant_type="none"``: keep them
    as ``nn.Linear`` in ``compute_dtype``: LoRA on a 16/32-bit base). A source saved by bitsandbytes in 4 bits
    keeps its own format (no re-quantization); ``quant=None`` dequantizes it. ``lora``: adapters added with
    ``qlorakit.lora.add_lora`` (they are the only trainable parameters). ``source``: see
    ``qlorakit.models.source``. With a 16-bit ``compute_dtype`` the fp32 norms get a forward hook that
    returns their input's dtype, so the residual stream stays 16-bit. ``hooks``: ``models.fill.FillHooks``
    (several processes: one rank's shard of each 4-bit linear, ``parallel.fsdp_load``).
    """
    resolved = source if isinstance(source, ModelSource) else resolve_source(source)
    device = torch.device(device)
    if quant is not None and not quant.quantized:
        quant = None
    if resolved.kind == GGUF:
        model, tensors, bnb_layers = _prepare_gguf(resolved, compute_dtype, trust_remote_code)
    else:
        model, tensors, bnb_layers = _prepare_directory(resolved, compute_dtype, trust_remote_code)
    fp32_names = norm_parameter_names(model)
    if quant is not None:
        patch_targets(model, resolve_targets(model, "all-linear"), quant, compute_dtype, device)
    Filler(model, device, compute_dtype, quant, fp32_names, bnb_layers, hooks=hooks).fill(tensors)
    _finish(model, resolved, device)
    if compute_dtype != torch.float32:
        keep_norm_outputs_in_input_dtype(model)
    if lora is not None:
        from qlorakit.lora import add_lora

        add_lora(model, lora)
    return model


def _prepare_directory(source: ModelSource, compute_dtype: torch.dtype, trust_remote_code: bool):
    """Config + validated checkpoint (before building anything), then the empty model."""
    config = load_config(source, trust_remote_code)
    checkpoint = open_checkpoint(source.path)
    bnb_layers = prequantized_layers(checkpoint.entries) if source.kind == BNB_4BIT else {}
    model = build_empty_model(config, compute_dtype, trust_remote_code)
    return model, checkpoint.tensors(), bnb_layers


def _prepare_gguf(source: ModelSource, compute_dtype: torch.dtype, trust_remote_code: bool):
    """GGUF header + type check + config, then the empty model and the renaming tensor stream."""
    from transformers import CONFIG_MAPPING

    header = read_gguf_header(source.path)
    check_tensor_types(header)
    config_dict = gguf_config_dict(header)
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{source.path}: transformers has no model class for GGUF model type {model_type!r}")
    config = config_from_dict(header, CONFIG_MAPPING[model_type], config_dict)
    model = build_empty_model(config, compute_dtype, trust_remote_code)
    return model, GgufTensorStream(header, model, config_dict), {}


def _finish(model: nn.Module, source: ModelSource, device: torch.device) -> None:
    model.tie_weights()
    missing = missing_names(model)
    if missing:
        raise ModelLoadError(
            f"{source.origin}: {len(missing)} tensor(s) of the model are not in the checkpoint, e.g. {missing[:20]}; "
            f"a shard is missing or truncated, or the weights belong to another model"
        )
    model.to(device)  # the buffers built on the CPU (rotary inv_freq); the weights are already there
    model.requires_grad_(False)
    model.eval()


def load_tokenizer(source: str | os.PathLike | ModelSource) -> Any:
    """The tokenizer of ``source``: a directory's tokenizer files, or the vocabulary inside a GGUF."""
    from transformers import AutoTokenizer

    resolved = source if isinstance(source, ModelSource) else resolve_source(source)
    try:
        if resolved.kind == GGUF:
            return AutoTokenizer.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name)
        return AutoTokenizer.from_pretrained(str(resolved.path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{resolved.origin}: no usable tokenizer ({type(exc).__name__}: {exc})") from exc
