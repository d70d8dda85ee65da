"""Tiny llama GGUF files written with the ``gguf`` package (Q8_0 linears, F32 norms) for the tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 256, 2, 4, 2, 128


def _linears(rng: np.random.Generator) -> dict[str, np.ndarray]:
    head_dim = HIDDEN // HEADS
    shapes = {
        "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN), "attn_v": (KV_HEADS * head_dim, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
    }  # fmt: skip
    return {
        f"blk.{i}.{name}.weight": rng.normal(0, 0.1, shape).astype(np.float32)
        for i in range(LAYERS)
        for name, shape in shapes.items()
    }


def write_tiny_llama_gguf(path: Path, linear_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0) -> Path:
    """A 2-layer llama with untied head; ``linear_type`` is the storage of every ``ffn_down`` weight."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    floats = {
        "token_embd.weight": rng.normal(0, 0.1, (VOCAB, HIDDEN)),
        "output.weight": rng.normal(0, 0.1, (VOCAB, HIDDEN)),
    }
    floats["output_norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
    for i in range(LAYERS):
        floats[f"blk.{i}.attn_norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
        floats[f"blk.{i}.ffn_norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
    for name, value in floats.items():
        writer.add_tensor(name, value.astype(np.float32))
    for name, value in _linears(rng).items():
        qtype = linear_type if "ffn_down" in name else gguf.GGMLQuantizationType.Q8_0
        _add_quantized(writer, name, value, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_quantized(writer: gguf.GGUFWriter, name: str, value: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        data = gguf.quants.quantize(value, qtype)  # uint8 (rows, bytes per row)
    else:  # a type the gguf package can store but not convert: zero bytes of the right size
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        data = np.zeros((value.shape[0], value.shape[1] // block * type_size), dtype=np.uint8)
    writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
