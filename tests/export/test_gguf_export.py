"""export_gguf: the merged model as a GGUF that qlorakit's own GGUF reader loads back with the merged logits.

Tolerances: the f32 export against the unmerged model in fp32, 2e-4 absolute on SmolLM2 logits of size ~30
(measured 5.6e-5): the only difference is ``x W^T + s (x A^T) B^T`` against ``x (W + s B A)^T`` summed in
another order over 30 layers. Quantized tensors are compared byte for byte with ``gguf.quants.quantize`` of
the fp32 merged weight: the merge is quantized exactly once.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qlorakit.errors import ConfigError
from qlorakit.export import export_gguf
from qlorakit.export.gguf_arch import TensorNames, arch_named, permute_rows
from qlorakit.export.gguf_types import check_output_type, tensor_type
from qlorakit.lora import disable_adapters
from qlorakit.models import load_model
from qlorakit.models.export import merged_weight
from qlorakit.models.gguf_reader import read_gguf_header, read_tensor_bytes
from tests.export.conftest import PROMPT_IDS

T = gguf.GGMLQuantizationType


def _tensors(path) -> dict[str, tuple[object, np.ndarray]]:
    header = read_gguf_header(path)
    with open(path, "rb") as f:
        return {t.name: (T(t.ggml_type), read_tensor_bytes(f, header, t)) for t in header.tensors}


def test_f32_export_loads_back_with_the_merged_models_logits(smollm2_trained, smollm2_f32_export):
    model, _ = smollm2_trained
    ids = torch.tensor([PROMPT_IDS])
    loaded = load_model(smollm2_f32_export, quant=None)
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    with torch.no_grad(), disable_adapters(model):
        base = model(ids).logits
    assert (base - expected).abs().max() > 1e-2  # the adapter is not a no-op, so the check above means something


def test_gguf_source_metadata_and_tokenizer_are_copied(smollm2_f32_export, smollm2_metadata):
    from qlorakit.export.gguf_meta import read_source_metadata

    written = read_source_metadata(smollm2_f32_export)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base",
                "llama.context_length"):
        assert written[key][0] == smollm2_metadata[key][0], key
    assert set(smollm2_metadata) <= set(written)
    assert read_gguf_header(smollm2_f32_export).metadata["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)


def test_f32_tensors_are_the_permuted_merged_weights_and_names_match_the_source(smollm2_trained, smollm2_f32_export,
                                                                                smollm2_path):
    model, _ = smollm2_trained
    exported = {t.name for t in read_gguf_header(smollm2_f32_export).tensors}
    assert exported == {t.name for t in read_gguf_header(smollm2_path).tensors}
    written = _tensors(smollm2_f32_export)
    names = TensorNames(model.config)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        gguf_name = names.gguf_name(f"{path}.weight")
        expected = permute_rows(merged_weight(model.get_submodule(path)).numpy(), names.row_heads(gguf_name))
        qtype, raw = written[gguf_name]
        assert qtype == T.F32
        np.testing.assert_array_equal(raw.view(np.float32).reshape(expected.shape), expected)


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0", "q4_0", "q5_1"])
def test_each_tensor_is_converted_once_from_the_fp32_merge(tiny_trained, tmp_path, out_type):
    source, model = tiny_trained
    out = tmp_path / f"tiny.{out_type}.gguf"
    report = export_gguf(model, source, out, out_type, progress=False)
    assert report.merged_layers == 14
    written = _tensors(out)
    names = TensorNames(model.config)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        gguf_name = names.gguf_name(f"{path}.weight")
        merged = permute_rows(merged_weight(model.get_submodule(path)).numpy(), names.row_heads(gguf_name))
        qtype, raw = written[gguf_name]
        assert qtype == tensor_type(gguf_name, merged.shape, out_type) == gguf.GGMLQuantizationType[out_type.upper()]
        expected = gguf.quants.quantize(merged, qtype).reshape(-1).view(np.uint8)
        np.testing.assert_array_equal(raw.reshape(-1).view(np.uint8), expected)
    assert written["blk.0.attn_norm.weight"][0] == T.F32
    assert written["token_embd.weight"][0] == (T.Q8_0 if out_type in ("q4_0", "q5_1") else T[out_type.upper()])


def test_tensor_types_fall_back_where_the_block_does_not_fit():
    assert tensor_type("blk.0.attn_q.weight", (576, 576), "tq2_0") == T.Q8_0  # 576 is no multiple of 256
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q4_0") == T.F16  # 48 is no multiple of 32
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), "tq2_0") == T.TQ2_0
    assert tensor_type("output.weight", (49152, 576), "q4_1") == T.Q8_0
    assert tensor_type("output_norm.weight", (576,), "q4_0") == T.F32


def test_types_the_writer_cannot_produce_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="llama-quantize in.gguf out.gguf Q4_K_M"):
        check_output_type("q4_k_m")
    with pytest.raises(ConfigError, match="unknown GGUF type 'q3'"):
        check_output_type("q3")
    assert check_output_type("Q8_0") == "q8_0"


def test_unsupported_architecture_is_named_with_the_supported_ones():
    with pytest.raises(ConfigError, match=r"'phi3' has no GGUF mapping.*llama, mistral, qwen2"):
        arch_named("phi3")


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tiny_trained, tmp_path):
    source, model = tiny_trained
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export_gguf(model, source, out, "f16", progress=False)
    assert out.read_bytes() == b"old"
    export_gguf(model, source, out, "f16", overwrite=True, progress=False)
    assert read_gguf_header(out).metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "tiny.gguf"]


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tiny_trained, tmp_path, monkeypatch):
    from qlorakit.export import gguf_types

    source, model = tiny_trained
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    calls = []

    def failing_encode(values, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(values, qtype)

    original = gguf_types.encode
    monkeypatch.setattr("qlorakit.export.gguf_model.encode", failing_encode)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, source, out, "f16", overwrite=True, progress=False)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "tiny.gguf"]


def test_low_bit_base_gets_a_note_with_the_size_cost(smollm2_path):
    from qlorakit.export.notes import low_bit_note
    from qlorakit.models import resolve_source

    note = low_bit_note(resolve_source(smollm2_path), 4 * smollm2_path.stat().st_size, "f16")
    assert "Q4_1 (5.00 bits per weight)" in note and "4.0x the source's size" in note
    assert "rounds those dequantized weights a second time" in low_bit_note(resolve_source(smollm2_path), 1, "q4_0")
