"""load_model on GGUF files: a tiny written one and the real SmolLM2-135M-Instruct (Q4_1).

The oracle is transformers' own ``from_pretrained(dir, gguf_file=...)`` in fp32, which dequantizes with
the same ``gguf.quants.dequantize``: with quant=None the logits agree to 1e-5 (they are in fact equal).
With NF4 the weights are rounded a second time (Q4_1 -> fp32 -> NF4), so the logits are only close; the
relative L2 difference on the prompt below is ~0.44, the same as bitsandbytes' NF4 of those weights
(the quantization is bit-identical to it), and the test bounds it at 0.6.
"""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers

from qlorakit.config import QuantConfig
from qlorakit.errors import ModelLoadError
from qlorakit.lora.targets import resolve_targets
from qlorakit.models import load_model, load_tokenizer, resolve_source
from qlorakit.models.gguf import gguf_config_dict
from qlorakit.models.gguf_reader import read_gguf_header
from qlorakit.quant import Linear4bit
from tests.helpers.gguf_files import write_tiny_llama_gguf
from tests.helpers.tiny_models import dequantized_reference, input_ids, logits

#: "The capital of France is Paris, and the capital of Germany is" in SmolLM2's tokenizer.
PROMPT_IDS = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 4521, 314]])


def _transformers_gguf(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tiny_gguf_unquantized_equals_transformers(tiny_gguf):
    ours = load_model(tiny_gguf, quant=None)
    torch.testing.assert_close(
        logits(ours, input_ids()), logits(_transformers_gguf(tiny_gguf), input_ids()), atol=1e-5, rtol=0
    )


def test_tiny_gguf_nf4_equals_dequantized_reference(tiny_gguf):
    ours = load_model(tiny_gguf)
    assert all(isinstance(ours.get_submodule(p), Linear4bit) for p in resolve_targets(ours, "all-linear"))
    reference = dequantized_reference(_transformers_gguf(tiny_gguf), QuantConfig())
    torch.testing.assert_close(logits(ours, input_ids()), logits(reference, input_ids()), atol=1e-5, rtol=0)


def test_directory_holding_one_gguf_resolves_to_it(tiny_gguf):
    source = resolve_source(tiny_gguf.parent)
    assert (source.kind, source.path) == ("gguf", tiny_gguf)


def test_gguf_without_vocabulary_has_no_tokenizer(tiny_gguf):
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf: no usable tokenizer"):
        load_tokenizer(tiny_gguf)


def test_unsupported_gguf_tensor_type_fails_before_loading(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "q8k.gguf", gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(ModelLoadError, match=r"Q8_K .*blk\.0\.ffn_down\.weight.*cannot be dequantized"):
        load_model(path)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """(transformers' fp32 GGUF model, its logits on PROMPT_IDS)."""
    model = _transformers_gguf(smollm2_gguf)
    return model, logits(model, PROMPT_IDS)


def test_smollm2_config_equals_transformers(smollm2_gguf, smollm2_reference):
    ours = gguf_config_dict(read_gguf_header(smollm2_gguf))
    theirs = smollm2_reference[0].config.to_dict()
    assert {k: theirs.get(k) for k in ours if k != "rope_theta"} == {k: v for k, v in ours.items() if k != "rope_theta"}
    assert theirs["rope_parameters"]["rope_theta"] == ours["rope_theta"] == 100000.0


def test_smollm2_alias_unquantized_equals_transformers(monkeypatch, seeded_cache, smollm2_reference):
    monkeypatch.setenv("QLORAKIT_CACHE", str(seeded_cache))
    ours = load_model("smollm2-135m-instruct", quant=None)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the GGUF has no output.weight
    torch.testing.assert_close(logits(ours, PROMPT_IDS), smollm2_reference[1], atol=1e-5, rtol=0)


def test_smollm2_nf4_is_close_to_fp32(smollm2_gguf, smollm2_reference):
    ours = load_model(smollm2_gguf)
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 210
    reference = smollm2_reference[1]
    ours_logits = logits(ours, PROMPT_IDS)
    relative = ((ours_logits - reference).norm() / reference.norm()).item()
    agreement = (ours_logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"SmolLM2 NF4+DQ vs fp32 logits: relative L2 {relative:.4f}, top-1 agreement {agreement:.3f}")
    assert relative < 0.6 and agreement >= 0.5
    assert ours_logits[0, -1].argmax() == reference[0, -1].argmax()  # both continue with the same token
