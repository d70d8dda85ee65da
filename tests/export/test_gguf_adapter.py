"""export_gguf_adapter: llama.cpp's LoRA layout (names, shapes, alpha), and its math on the base GGUF.

The layout check reproduces llama.cpp's use of the file in numpy: ``W + (alpha / r) * B @ A`` over the
adapter's tensors and the f32 base export equals the merged f32 export (fp32, atol 1e-6: one more rounding
of the product's sum order).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError
from qlorakit.export import export_gguf, export_gguf_adapter
from qlorakit.lora import disable_adapters, lora_layers
from qlorakit.models import load_model
from qlorakit.models.gguf_reader import read_gguf_header, read_tensor_bytes


def _f32(path) -> tuple[dict, dict[str, np.ndarray]]:
    header = read_gguf_header(path)
    with open(path, "rb") as f:
        arrays = {t.name: read_tensor_bytes(f, header, t).view(np.float32).reshape(t.shape) for t in header.tensors}
    return header.metadata, arrays


def test_adapter_gguf_has_llama_cpps_names_shapes_and_alpha(tiny_trained, tmp_path):
    _source, model = tiny_trained
    report = export_gguf_adapter(model, tmp_path / "adapter.gguf", progress=False)
    metadata, tensors = _f32(report.path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["general.type"] == "adapter" and metadata["adapter.type"] == "lora"
    assert metadata["adapter.lora.alpha"] == 8.0 and (report.rank, report.layers) == (4, 14)
    assert len(tensors) == 28
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)  # A (r, in): ggml ne [in, r]
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (32, 4)  # B (out, r): ggml ne [r, out]
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape == (4, 256)
    layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
    lora_b = layer.lora_B["default"].weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_b"], lora_b)


def test_adapter_on_the_base_gguf_gives_the_merged_export(tiny_trained, tmp_path):
    source, model = tiny_trained
    merged = export_gguf(model, source, tmp_path / "merged.gguf", "f32", progress=False).path
    with disable_adapters(model):
        base = export_gguf(model, source, tmp_path / "base.gguf", "f32", progress=False).path
    adapter = export_gguf_adapter(model, tmp_path / "adapter.gguf", progress=False).path
    meta, lora = _f32(adapter)
    _, merged_t = _f32(merged)
    _, base_t = _f32(base)
    scale = meta["adapter.lora.alpha"] / lora["blk.0.attn_q.weight.lora_b"].shape[1]  # llama.cpp: alpha / rank
    for name in [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]:
        applied = base_t[name] + scale * (lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"])
        np.testing.assert_allclose(applied, merged_t[name], rtol=0, atol=1e-6, err_msg=name)
    assert not np.allclose(base_t["blk.0.attn_q.weight"], merged_t["blk.0.attn_q.weight"])


def test_rslora_alpha_is_written_so_that_alpha_over_r_is_its_scale(tmp_path):
    from tests.helpers.gguf_files import write_tiny_llama_gguf

    model = load_model(write_tiny_llama_gguf(tmp_path / "t.gguf"), lora=LoraConfig(r=4, alpha=8, rslora=True))
    report = export_gguf_adapter(model, tmp_path / "a.gguf", progress=False)
    assert read_gguf_header(report.path).metadata["adapter.lora.alpha"] == pytest.approx(16.0)  # 8 * sqrt(4)


def test_q8_0_adapter_keeps_rank_rows_that_do_not_fit_the_block_in_f16(tiny_trained, tmp_path):
    _source, model = tiny_trained
    header = read_gguf_header(export_gguf_adapter(model, tmp_path / "a.gguf", "q8_0", progress=False).path)
    types = {t.name: gguf.GGMLQuantizationType(t.ggml_type).name for t in header.tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.attn_q.weight.lora_b"] == "F16"


def test_model_without_an_active_adapter_is_refused(tmp_path):
    from tests.helpers.gguf_files import write_tiny_llama_gguf

    model = load_model(write_tiny_llama_gguf(tmp_path / "t.gguf"))
    with pytest.raises(ConfigError, match="no active LoRA adapter"):
        export_gguf_adapter(model, tmp_path / "a.gguf", progress=False)


def test_adapter_on_a_tied_head_is_refused(tmp_path):
    import transformers

    from qlorakit.lora.model import add_lora_at
    from tests.helpers.tiny_llama import tiny_llama_config

    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    add_lora_at(model, ["lm_head", "model.layers.0.self_attn.q_proj"], LoraConfig(r=2, alpha=2), "default")
    with pytest.raises(ConfigError, match="ties to the input embedding"):
        export_gguf_adapter(model, tmp_path / "a.gguf", progress=False)
    assert not list(tmp_path.iterdir())
