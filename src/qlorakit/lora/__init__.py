"""LoRA adapters on the linear layers of a (4-bit) base model, merged or saved in PEFT's layout.

``y = base(x) + scale * B(A(dropout(x)))`` per adapted linear (see ``lora.layer``); ``add_lora`` wraps the
targets, ``save_adapter`` / ``load_adapter`` read and write ``adapter_config.json`` +
``adapter_model.safetensors`` exactly as ``peft`` does.
"""

from qlorakit.lora.layer import LoraLinear, MergeError
from qlorakit.lora.model import (
    adapter_names,
    add_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_layers,
    lora_state_dict,
    merge_adapters,
    set_active_adapter,
    set_adapters_enabled,
    trainable_parameters,
    unmerge_adapters,
)
from qlorakit.lora.peft_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_adapter_dir,
    load_adapter,
    save_adapter,
)
from qlorakit.lora.targets import linear_names, resolve_targets

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraLinear",
    "MergeError",
    "adapter_names",
    "add_lora",
    "check_adapter_dir",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "linear_names",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_adapters",
    "resolve_targets",
    "save_adapter",
    "set_active_adapter",
    "set_adapters_enabled",
    "trainable_parameters",
    "unmerge_adapters",
]
