"""Tiny valid files that the fuzz targets mutate, written with the project's (or the format's own) writers.

Each builder is cached: the seeds are built once per process. Byte offsets of the integer fields of the
binary seeds (GGUF counts and lengths, the safetensors header length) are found by walking the seed,
so the huge-integer mutation can aim at them.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Name a colour.", "input": "one word", "output": "Blue"}]
DOLLY = [{"instruction": "Say hi.", "context": "", "response": "Hi!"}]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
SELF_INSTRUCT = [{"instruction": "Double it.",
                  "instances": [{"input": "2", "output": "4"}, {"input": "5", "output": "10"}]}]
OASST_TREE = [{"message_id": "m1", "parent_id": None, "role": "prompter", "text": "Hi?"},
              {"message_id": "m2", "parent_id": "m1", "role": "assistant", "text": "Hello."},
              {"message_id": "m3", "parent_id": "m1", "role": "assistant", "text": "Hey."}]
GUANACO = [{"text": "### Human: Hi ### Assistant: Hello there."}, {"text": "Plain text, é ü 日本."}]
#: Row sets of every data format; a JSON/JSONL/Parquet seed is one of them.
DATA_ROWS = (ALPACA, DOLLY, MESSAGES, SELF_INSTRUCT, OASST_TREE, GUANACO)
CSV_ROWS = ([["instruction", "input", "output"], ["Add 2 and 3.", "", "5"], ["Say, hi", "x\ny", "Hi"]],
            [["text"], ["line one"], ["### Human: a ### Assistant: b"]])
TEXT = "First line.\nSecond line, with ü and 日本.\n\n  indented\n"

MMLU_ROWS = ([["What is 1+1?", "1", "2", "3", "4", "B"], ["Pick, with a comma", "a", "b", "c", "d", "D"]],
             [["question", "choice0", "choice1", "choice2", "choice3", "answer"], ["Q?", "w", "x", "y", "z", "0"]])

PAIRWISE_NAME = "a-vs-b-gpt-4-reviewer.jsonl"
PAIRWISE_ROWS = [{"question_id": i, "answer1_id": f"a{i}", "answer2_id": f"b{i}", "text": "...", "score": s}
                 for i, s in enumerate((1, 2, 3, -1))]
RELATIVE_NAMES = ("gpt-3.5-vs-sys-gpt-4-reviewer.jsonl", "gpt-3.5-vs-other-gpt-4-reviewer.jsonl")
ANSWERS_NAME = "answers.jsonl"


def relative_rows(system: str) -> list[dict[str, Any]]:
    """Judgements of ``system`` against the reference: answer 1 is the reference's (``r<i>``)."""
    return [{"question_id": i, "answer1_id": f"r{i}", "answer2_id": f"{system}{i}", "text": "", "score": score}
            for i, score in enumerate(([8, 7], [6, 9.5], [-1, -1]))]


REFERENCE_ANSWERS = [{"question_id": i, "answer_id": f"r{i}", "text": "..."} for i in range(3)]


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@functools.cache
def parquet_seed(index: int) -> bytes:
    """The rows of ``DATA_ROWS[index]`` as a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(DATA_ROWS[index]), buffer)
    return buffer.getvalue()


# --- GGUF ------------------------------------------------------------------------------------------


@functools.cache
def gguf_seed() -> tuple[bytes, tuple[int, ...], int]:
    """A tiny llama GGUF (1 block, F32 and Q8_0 tensors, a vocabulary): bytes, integer-field offsets, header size."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name("tiny")
        for add, value in (("block_count", 1), ("context_length", 16), ("embedding_length", 32),
                           ("feed_forward_length", 64), ("head_count", 2), ("head_count_kv", 1),
                           ("rope_dimension_count", 16), ("vocab_size", 8)):
            getattr(writer, f"add_{add}")(value)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(10000.0)
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"t{i}" for i in range(8)])
        writer.add_token_scores([float(-i) for i in range(8)])
        writer.add_token_types([1] * 8)
        writer.add_tensor("token_embd.weight", rng.normal(size=(8, 32)).astype(np.float32))
        writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
        q8 = gguf.quants.quantize(rng.normal(size=(32, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("blk.0.attn_q.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = path.read_bytes()
    fields, header_end = gguf_fields(data)
    return data, fields, header_end


def gguf_fields(data: bytes) -> tuple[tuple[int, ...], int]:
    """Offsets of every count, length, type and dimension field of a valid GGUF, and the header's end."""
    fields = [8, 16]
    (_, tensors, kvs) = struct.unpack_from("<IQQ", data, 4)
    pos = 24

    def string(at: int) -> int:
        fields.append(at)
        return at + 8 + struct.unpack_from("<Q", data, at)[0]

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(kvs):
        pos = string(pos)
        fields.append(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if kind == 8:
            pos = string(pos)
        elif kind == 9:
            fields.extend((pos, pos + 4))
            element, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                pos = string(pos) if element == 8 else pos + sizes[element]
        else:
            pos += sizes[kind]
    for _ in range(tensors):
        pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields.extend(pos + 4 * i for i in range(1 + 2 * n_dims + 3))
        pos += 4 + 8 * n_dims + 12
    return tuple(fields), pos


# --- safetensors and adapters ----------------------------------------------------------------------


@functools.cache
def safetensors_seed(shard: int = 0) -> bytes:
    """A small safetensors file (F32, BF16, I64 scalar) with ``__metadata__``; ``shard`` 1 holds other names."""
    import torch
    from safetensors.torch import save

    if shard:
        return save({"d.weight": torch.arange(6, dtype=torch.float16).reshape(3, 2)}, metadata={"format": "pt"})
    tensors = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b.bias": torch.ones(4, dtype=torch.bfloat16), "c.step": torch.tensor(7, dtype=torch.int64)}
    return save(tensors, metadata={"format": "pt"})


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the data section of a valid safetensors file."""
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header_text: str, body: bytes, length: int | None = None) -> bytes:
    encoded = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + body


def safetensors_index() -> dict[str, Any]:
    names = {**split_safetensors(safetensors_seed(0))[0], **split_safetensors(safetensors_seed(1))[0]}
    shard_of = {name: "model-00001-of-00002.safetensors" for name in split_safetensors(safetensors_seed(0))[0]}
    shard_of["d.weight"] = "model-00002-of-00002.safetensors"
    return {"metadata": {"total_size": 60}, "weight_map": {k: shard_of[k] for k in names if k != "__metadata__"}}


@functools.cache
def tiny_model():
    """A 1-block llama (hidden 16) in fp32, the base the adapter target loads into."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config).eval()


@functools.cache
def adapter_seed() -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` saved by ``lora.save_adapter`` for ``tiny_model``."""
    import copy

    from qlorakit.config import LoraConfig
    from qlorakit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, save_adapter

    model = copy.deepcopy(tiny_model())
    add_lora(model, LoraConfig(r=2, alpha=4.0, dropout=0.0, targets=("q_proj", "v_proj")))
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_adapter(model, Path(tmp) / "adapter", base_model_name_or_path="tiny")
        return (directory / ADAPTER_CONFIG).read_bytes(), (directory / ADAPTER_WEIGHTS).read_bytes()
