"""Load the model an evaluation scores: base model (4-bit like the trainer by default), tokenizer, optional adapter.

``check_adapter_dir`` runs before the model is loaded so that a wrong path fails in a second; whether the
adapter fits the base (same layers, same shapes) is checked by ``qlorakit.lora.load_adapter`` before it
changes the model, and a mismatch raises ``StateDictError`` naming the layer and "another base model".
"""

from __future__ import annotations

import os
from typing import Any

from qlorakit.config import QuantConfig
from qlorakit.lora.peft_io import check_adapter_dir as lora_check_adapter_dir


def check_adapter_dir(directory: str | os.PathLike | None) -> None:
    """Nothing when ``directory`` is None, else ``lora.check_adapter_dir`` (a PEFT adapter's two files)."""
    if directory is not None:
        lora_check_adapter_dir(directory)


#: The trainer's storage format (NF4, block 64, double quantization).
TRAIN_QUANT = QuantConfig()


def load_for_eval(
    source: str, quant: QuantConfig | None = TRAIN_QUANT, adapter: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode, fp32 compute; ``quant=None`` keeps the linears unquantized."""
    from qlorakit.lora import load_adapter
    from qlorakit.models import load_model, load_tokenizer

    check_adapter_dir(adapter)
    tokenizer = load_tokenizer(source)
    model = load_model(source, quant=quant)
    if adapter is not None:
        load_adapter(model, adapter)
        model.eval()
    return model, tokenizer
