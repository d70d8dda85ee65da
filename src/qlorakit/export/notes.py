"""What an export tells the user about its base: a base whose weights exist only in 4 (or 5) bits.

When the source stores its linear weights below 8 bits per weight (a Q4_1 / Q4_K GGUF such as the default
SmolLM2, or a bitsandbytes 4-bit directory), the full-precision weights are gone: an export holds their
dequantized values plus the adapter. A 16/32-bit export is then several times the source's size without
recovering any precision, and a 4/5-bit export rounds those weights a second time.
"""

from __future__ import annotations

import math

from qlorakit.models.gguf_reader import read_gguf_header
from qlorakit.models.source import BNB_4BIT, GGUF, ModelSource

#: Storage below this many bits per weight counts as "only in low bit".
LOW_BITS = 8.0


def source_bits(source: ModelSource) -> tuple[float, str] | None:
    """(bits per weight, type name) of the source's linear weights when below ``LOW_BITS``, else ``None``."""
    if source.kind == BNB_4BIT:
        return 4.0, "bitsandbytes 4-bit"
    if source.kind != GGUF:
        return None
    import gguf

    sizes: dict[str, int] = {}
    bits = 0.0
    for info in read_gguf_header(source.path).tensors:
        if len(info.shape) == 2 and info.name.startswith("blk."):
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
            sizes[info.type_name] = sizes.get(info.type_name, 0) + math.prod(info.shape)
            bits += math.prod(info.shape) * 8 * type_size / block
    total = sum(sizes.values())
    if not total or bits / total >= LOW_BITS:
        return None
    return bits / total, max(sizes, key=sizes.get)


def low_bit_note(source: ModelSource, out_nbytes: int, out_type: str) -> str | None:
    """The note printed after an export from a low-bit base (module docstring), or ``None``."""
    found = source_bits(source)
    if found is None:
        return None
    bits, name = found
    size = sum(p.stat().st_size for p in ([source.path] if source.kind == GGUF else source.path.glob("*.safetensors")))
    cost = (f"this {out_type} file is {out_nbytes / size:.1f}x the source's size and recovers no precision"
            if out_type in ("f32", "f16", "bf16") else
            f"{out_type} rounds those dequantized weights a second time (docs/export.md measures the perplexity cost)")
    return (f"the base stores its decoder weights in {name} ({bits:.2f} bits per weight), so its full-precision "
            f"weights are gone: this export holds their dequantized values plus the adapter; {cost}")
