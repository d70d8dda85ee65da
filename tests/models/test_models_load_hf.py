"""load_model on local Hugging Face directories (safetensors, single file and sharded).

Tolerances (fp32, CPU): 1e-5 absolute on logits of magnitude ~1. The weights are identical bit for bit
(quant=None) or dequantize(quantize(W)) on both sides (quant), so the only differences are the order of
floating-point operations (our 4-bit matmul computes ``x @ W.T``, ``nn.Linear`` calls ``addmm``).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from qlorakit.config import LoraConfig, QuantConfig
from qlorakit.lora.targets import resolve_targets
from qlorakit.models import load_model
from qlorakit.quant import Linear4bit
from tests.helpers.tiny_models import ARCHS, dequantized_reference, input_ids, logits, make_model

ATOL = 1e-5


def _reference(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_unquantized_load_gives_transformers_logits(saved_model, arch):
    directory = saved_model(arch)
    ours = load_model(directory, quant=None)
    assert all(isinstance(ours.get_submodule(p), nn.Linear) for p in resolve_targets(ours, "all-linear"))
    ids = input_ids()
    torch.testing.assert_close(logits(ours, ids), logits(_reference(directory), ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_nf4_load_gives_dequantized_reference_logits(saved_model, arch):
    directory = saved_model(arch)
    quant = QuantConfig()
    ours = load_model(directory, quant=quant)
    reference = dequantized_reference(_reference(directory), quant)
    ids = input_ids()
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_target_is_linear4bit_and_head_norms_are_not_quantized(saved_model, arch):
    model = load_model(saved_model(arch))
    targets = resolve_targets(model, "all-linear")
    assert len(targets) == 7 * model.config.num_hidden_layers
    assert all(isinstance(model.get_submodule(p), Linear4bit) for p in targets)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Linear4bit)
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert norms and all(p.dtype == torch.float32 for p in norms.values())
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_qwen2_biases_survive_quantization(saved_model):
    model = load_model(saved_model("qwen2"))
    reference = _reference(saved_model("qwen2"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.bias is not None
    torch.testing.assert_close(q_proj.bias, reference.model.layers[0].self_attn.q_proj.bias, atol=0, rtol=0)


def test_sharded_checkpoint_loads_like_single_file(saved_model):
    sharded = saved_model("llama", "40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    ids = input_ids()
    for quant in (None, QuantConfig()):
        torch.testing.assert_close(
            logits(load_model(sharded, quant=quant), ids), logits(load_model(saved_model("llama"), quant=quant), ids),
            atol=0, rtol=0,
        )  # fmt: skip


def test_tied_head_shares_the_embedding(saved_model):
    model = load_model(saved_model("gemma"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_compute_dtype_bfloat16_keeps_norms_fp32(saved_model):
    model = load_model(saved_model("llama"), compute_dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    assert torch.isfinite(logits(model, input_ids()).float()).all()


def test_nf4_without_double_quant_and_fp4_formats(saved_model):
    for quant in (QuantConfig(double_quant=False), QuantConfig(quant_type="fp4", blocksize=128)):
        model = load_model(saved_model("mistral"), quant=quant)
        layer = model.model.layers[1].mlp.down_proj
        assert (layer.qweight.quant_type, layer.qweight.blocksize, layer.qweight.double_quant) == (
            quant.quant_type, quant.blocksize, quant.double_quant,
        )  # fmt: skip
        reference = dequantized_reference(_reference(saved_model("mistral")), quant)
        torch.testing.assert_close(logits(model, input_ids()), logits(reference, input_ids()), atol=ATOL, rtol=0)


def test_lora_wraps_every_target_and_trains_only_adapters(saved_model):
    lora_layer = pytest.importorskip("qlorakit.lora.layer")
    model = load_model(saved_model("llama"), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    targets = resolve_targets(model, "all-linear")
    assert len(targets) == 14
    for path in targets:
        module = model.get_submodule(path)
        assert isinstance(module, lora_layer.LoraLinear) and isinstance(module.base_layer, Linear4bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B = 0 at init: the adapted model computes what the 4-bit base computes.
    torch.testing.assert_close(
        logits(model, input_ids()), logits(load_model(saved_model("llama")), input_ids()), atol=0, rtol=0
    )


def test_load_tokenizer_reads_a_saved_tokenizer(tmp_path, saved_model):
    tokenizers = pytest.importorskip("tokenizers")
    from qlorakit.models import load_tokenizer

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    make_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((saved_model("llama") / "model.safetensors").read_bytes())
    assert load_tokenizer(tmp_path)("ab")["input_ids"] == [3]
