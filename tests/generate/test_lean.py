"""The lean decoding forward against transformers' own forward with a DynamicCache, step by step.

Architectures: Llama (grouped-query heads), Mistral, Qwen2 (q/k/v biases); bases: NF4 (the compiled GEMV
for few rows, dequantize + matmul for a long prefill) and fp32 linears; with and without LoRA adapters
(random non-zero B), switching adapters between requests, and with fused shared-input adapters.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qlorakit.config import LoraConfig
from qlorakit.generate import generate_ids
from qlorakit.generate.decode import _reference_forward
from qlorakit.generate.lean import LeanDecoder, unsupported_reason
from qlorakit.lora import add_lora
from qlorakit.lora.fused import fuse_shared_inputs
from qlorakit.lora.layer import LoraLinear
from qlorakit.models import quantize_model
from qlorakit.quant.linear import Linear4bit

VOCAB = 300
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": None}  # fmt: skip
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
}


def _model(arch: str, quantized: bool = True, seed: int = 0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SHAPE, **extra)).eval()
    if arch == "qwen2":  # its q/k/v biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if quantized:
        quantize_model(model)
    return model


def _add_adapter(model, name: str, seed: int) -> None:
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear) and name in module.lora_B:
                module.lora_B[name].weight.normal_(0, 0.2, generator=generator)


def _set_active(model, name):
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.set_active(name)


def _assert_steps_match(model, prompt_len: int, steps: int = 6) -> None:
    """Prefill + ``steps`` single-token steps, feeding the same greedy tokens to both forwards."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, prompt_len))
    lean = LeanDecoder(model, prompt_len + steps + 1).step
    reference = _reference_forward(model)
    with torch.inference_mode():
        for _ in range(steps + 1):
            got, want = lean(ids), reference(ids)  # (vocab,)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            ids = want.argmax().view(1, 1)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "fp32"])
@pytest.mark.parametrize("prompt_len", [7, 40], ids=["short-prefill", "long-prefill"])
def test_lean_logits_equal_transformers_every_step(arch, quantized, prompt_len):
    _assert_steps_match(_model(arch, quantized), prompt_len)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_applies_the_active_adapter_and_switches(arch):
    model = _model(arch)
    _add_adapter(model, "one", seed=1)
    _add_adapter(model, "two", seed=2)
    for active in ("one", "two", None):
        _set_active(model, active)
        _assert_steps_match(model, prompt_len=9, steps=3)


def test_lean_with_fused_shared_input_adapters():
    model = _model("llama")
    _add_adapter(model, "one", seed=3)
    _set_active(model, "one")
    fuse_shared_inputs(model, "one")
    _assert_steps_match(model, prompt_len=9, steps=3)


@pytest.mark.parametrize("helper", ["LoraLinear.add_delta", "Linear4bit._project"])
def test_lean_runs_each_layers_own_math(monkeypatch, helper):
    """Shifting the adapter update (``LoraLinear.add_delta``) or the 4-bit projection (``Linear4bit._project``:
    casts, product, bias) by 1.0 shifts lean's logits, which still equal transformers' forward: lean repeats
    neither, it calls the layers' bound projections."""
    model = _model("llama")
    _add_adapter(model, "one", seed=1)
    _set_active(model, "one")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    before = LeanDecoder(model, 8).step(ids)
    cls, name = {"LoraLinear": LoraLinear, "Linear4bit": Linear4bit}[helper.split(".")[0]], helper.split(".")[1]
    original = getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda self, *args: original(self, *args) + 1.0)
    shifted = LeanDecoder(model, 8).step(ids)
    assert float((shifted - before).abs().max()) > 1e-2
    _assert_steps_match(model, prompt_len=9, steps=2)


def test_generate_ids_lean_and_reference_give_the_same_tokens():
    model = _model("llama")
    prompt = list(range(5, 25))
    assert list(generate_ids(model, prompt, 10, lean=True)) == list(generate_ids(model, prompt, 10, lean=False))


def test_unsupported_models_are_named_and_fall_back():
    model = _model("mistral")
    model.config.sliding_window = 8
    assert "sliding window" in unsupported_reason(model, 20)
    assert unsupported_reason(model, 8) is None
    prompt = list(range(3, 13))
    assert list(generate_ids(model, prompt, 5, lean=True)) == list(generate_ids(model, prompt, 5, lean=False))
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(**SHAPE, head_dim=16)).eval()
    assert "model_type 'gemma'" in unsupported_reason(gemma, 10)
    with pytest.raises(ValueError, match="cannot run this model"):
        LeanDecoder(gemma, 10)


def test_lean_refuses_positions_past_max_len():
    decoder = LeanDecoder(_model("llama"), 4)
    decoder.step(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="exceed the decoder's max_len"):
        decoder.step(torch.tensor([[4, 5]]))


def test_lean_leaves_the_model_unchanged():
    model = _model("llama")
    before = copy.deepcopy(model.state_dict())
    LeanDecoder(model, 16).step(torch.tensor([[1, 2, 3]]))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lean_chunked_prefill_masks_the_new_rows_causally():
    model = _model("llama")
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 12))
    lean, reference = LeanDecoder(model, 12).step, _reference_forward(model)
    with torch.inference_mode():
        for chunk in (ids[:, :5], ids[:, 5:]):  # the second chunk sees 5 cached positions
            torch.testing.assert_close(lean(chunk), reference(chunk), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_with_a_bf16_compute_model_from_load_model(arch, tmp_path):
    from qlorakit.models import load_model

    _model(arch, quantized=False).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), compute_dtype=torch.bfloat16)
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 9))
    lean, reference = LeanDecoder(model, 14).step, _reference_forward(model)
    with torch.inference_mode():
        for _ in range(4):
            got, want = lean(ids), reference(ids)
            assert got.dtype == want.dtype == torch.bfloat16
            # observed: equal
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-3 * float(want.abs().max()))
            ids = want.argmax().view(1, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_applies_a_dora_adapter_and_switches(arch):
    model = _model(arch)
    _add_adapter(model, "plain", seed=4)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, dora=True), name="dora")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B["dora"].weight.normal_(0, 0.2, generator=generator)
                module.lora_magnitude_vector["dora"].weight.mul_(1.5)  # visible after the row normalisation
    for active in ("dora", "plain", "dora"):  # the cached DoRA norm survives the switch back
        _set_active(model, active)
        _assert_steps_match(model, prompt_len=9, steps=3)
