"""Loading a directory saved by transformers + bitsandbytes in 4 bits (NF4, double quant): as saved.

The oracle is transformers + bitsandbytes 0.50.2 itself, on CPU, with ``support_avx512bf16_for_cpu``
set to False on every bnb ``Linear4bit`` before the first forward (otherwise bnb repacks the weight on
that forward into a CPU layout with a bf16 absmax, and its numbers change). Logits agree to 1e-5 (fp32;
same dequantized weights, matmul order may differ).

The tiny model's linears all have in_features a multiple of 64: bitsandbytes 0.50.2's CPU
``dequantize_4bit`` kernel returns wrong values when the last dimension is a multiple of 16 but not of
the block size (e.g. 32, 48, 96, 160) although the packed bytes are right; it is not an oracle there.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

from qlorakit.lora.targets import resolve_targets
from qlorakit.models import load_model, resolve_source
from qlorakit.quant import Linear4bit
from tests.helpers.tiny_models import input_ids, logits, make_model, save

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bnb_saved(tmp_path_factory):
    """(directory saved in 4 bits, the transformers+bnb model that saved it)."""
    root = tmp_path_factory.mktemp("bnb")
    save(make_model("llama", intermediate_size=128), root / "fp32")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        root / "fp32", quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    model.save_pretrained(root / "nf4")  # before any forward
    return root / "nf4", model.eval()


def test_bnb_directory_is_recognised(bnb_saved):
    assert resolve_source(bnb_saved[0]).kind == "bnb-4bit"


def test_packed_weights_and_quant_state_are_byte_identical_to_the_file(bnb_saved):
    directory, _ = bnb_saved
    ours = load_model(directory)
    state = ours.state_dict()
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        names = f.keys()  # a safe_open handle: no `in`
        quantized = [k for k in names if ".weight." in k or k.endswith("proj.weight")]
        assert len(quantized) == 14 * 6  # weight, absmax, quant_map, nested_absmax, nested_quant_map, quant_state
        for key in quantized:
            assert torch.equal(state[key], f.get_tensor(key)), key
    assert all(isinstance(ours.get_submodule(p), Linear4bit) for p in resolve_targets(ours, "all-linear"))


def test_logits_equal_transformers_bitsandbytes(bnb_saved):
    directory, reference = bnb_saved
    ids = input_ids()
    torch.testing.assert_close(logits(load_model(directory), ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_quant_none_dequantizes_the_saved_weights(bnb_saved):
    directory, reference = bnb_saved
    ours = load_model(directory, quant=None)
    layer = ours.model.layers[1].mlp.down_proj
    assert type(layer) is nn.Linear
    saved = reference.model.layers[1].mlp.down_proj
    expected = bnb.functional.dequantize_4bit(saved.weight.data, saved.weight.quant_state)
    torch.testing.assert_close(layer.weight, expected, atol=0, rtol=0)
    ids = input_ids()
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), atol=1e-5, rtol=0)
