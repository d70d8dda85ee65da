"""4-bit storage of frozen weights: code tables, blockwise (double) quantization, ``Linear4bit``.

Pure torch; nothing here imports the rest of qlorakit except ``qlorakit.errors``.
"""

from qlorakit.quant.codebooks import QUANT_TYPES, code_table
from qlorakit.quant.functional import bits_per_param, dequantize_4bit, quantize_4bit
from qlorakit.quant.linear import Linear4bit, matmul_4bit
from qlorakit.quant.tensor import BLOCKSIZES, QuantizedTensor

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "Linear4bit",
    "QuantizedTensor",
    "bits_per_param",
    "code_table",
    "dequantize_4bit",
    "matmul_4bit",
    "quantize_4bit",
]
