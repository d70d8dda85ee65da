"""The GGUF tensor types an export can write, and which type each tensor of the file gets.

Writable types are the ones the ``gguf`` package (0.19) can *quantize* in numpy: ``F32``, ``F16``, ``BF16``,
``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``MXFP4``, ``TQ1_0`` and ``TQ2_0``. The k-quants (``Q2_K`` ..
``Q6_K``) and i-quants (``IQ*``) have only a dequantizer there; they are produced by llama.cpp's C
``llama-quantize`` (k-quants search scales per 16/32-value sub-block; i-quants need an importance matrix and
lattice codebooks), so ``qlorakit export gguf --type q4_k_m`` is refused with that advice.

Per tensor (``tensor_type``), as llama.cpp's own converter and quantizer do:

- 1-D tensors (norms, biases) are always ``F32`` (llama.cpp computes norms in fp32);
- with a sub-8-bit type, the token embedding and the output head are written in ``Q8_0``: they are the most
  sensitive tensors (llama-quantize keeps them at ``Q6_K``, which this writer cannot produce);
- a tensor whose rows are not a multiple of the type's block (``TQ*``: 256 values) falls back to ``Q8_0``
  when its rows are a multiple of 32, else ``F16``.

``TQ1_0`` / ``TQ2_0`` are ternary (-1, 0, +1 times a block scale): they fit models trained ternary (BitNet
b1.58); an ordinary model exported to them loses most of its quality (docs/export.md has the perplexity).
"""

from __future__ import annotations

import math
from typing import Any

from qlorakit.errors import ConfigError


def _types() -> dict[str, tuple[str, str]]:
    """``--type`` name -> (``GGMLQuantizationType`` name, ``LlamaFileType`` name)."""
    return {
        "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
        "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
        "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "mxfp4": ("MXFP4", "MOSTLY_MXFP4_MOE"),
        "tq1_0": ("TQ1_0", "MOSTLY_TQ1_0"), "tq2_0": ("TQ2_0", "MOSTLY_TQ2_0"),
    }  # fmt: skip


#: The ``--type`` values, in the order ``--help`` lists them.
OUTPUT_TYPES: tuple[str, ...] = tuple(_types())
#: The types llama.cpp's convert_lora_to_gguf.py writes an adapter in.
ADAPTER_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
#: Types whose weights keep 8 or more bits; every other output type keeps the embedding/head in ``Q8_0``.
_WIDE = ("f32", "f16", "bf16", "q8_0")
#: GGUF names of the tensors kept in ``Q8_0`` under a sub-8-bit type.
_SENSITIVE = ("token_embd.weight", "output.weight")


def check_output_type(name: str, allowed: tuple[str, ...] = OUTPUT_TYPES) -> str:
    """``name`` lower-cased if the writer can produce it, else a ``ConfigError`` that says why not."""
    key = name.lower()
    if key in allowed:
        return key
    if key.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq")):
        raise ConfigError(
            f"GGUF type {name!r} cannot be written by the gguf package (it has no quantizer for k-/i-quants); "
            f"export f16 or q8_0 and run llama.cpp's `llama-quantize in.gguf out.gguf {name.upper()}`, "
            f"or choose one of {', '.join(allowed)}"
        )
    raise ConfigError(f"unknown GGUF type {name!r}; choose one of {', '.join(allowed)}")


def ggml_type(name: str):
    """The ``gguf.GGMLQuantizationType`` of ``--type`` ``name``."""
    import gguf

    return gguf.GGMLQuantizationType[_types()[name][0]]


def file_type(name: str) -> int:
    """The ``general.file_type`` value (``gguf.LlamaFileType``) llama.cpp reports for ``--type`` ``name``."""
    import gguf

    return int(gguf.LlamaFileType[_types()[name][1]])


def tensor_type(gguf_name: str, shape: tuple[int, ...], requested: str):
    """The ``GGMLQuantizationType`` tensor ``gguf_name`` of torch shape ``shape`` gets under ``requested``."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return types.F32
    qtype = ggml_type(requested)
    if requested not in _WIDE and gguf_name in _SENSITIVE:
        qtype = types.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        qtype = types.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0 else types.F16
    return qtype


def encoded_nbytes(shape: tuple[int, ...], qtype) -> int:
    """Bytes of a tensor of torch shape ``shape`` stored as ``qtype``."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def encode(values: Any, qtype) -> Any:
    """``values`` (fp32 ndarray, torch shape) in ``qtype``'s stored layout, for ``GGUFWriter.write_tensor_data``."""
    import gguf
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return values
    return gguf.quants.quantize(values, qtype)  # f16 array, or uint8 (rows, bytes per row)
