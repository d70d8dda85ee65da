"""PEFT interop against the real ``peft``: ours saved -> PeftModel.from_pretrained, and peft saved -> ours.

Both sides compute the same fp32 ops on the same weights (base x W^T + scale * B A x), so the logits agree
to float rounding; we allow rtol = atol = 1e-5 (observed: bitwise equal). Every adapter gets random nonzero
B first and we check that it moves the logits by > 1e-2, so a dropped or mis-keyed adapter fails.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlorakit.config import LoraConfig
from qlorakit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_names,
    add_lora,
    load_adapter,
    lora_layers,
    save_adapter,
    trainable_parameters,
)
from tests.helpers.lora import LLAMA_PROJECTIONS, randomize_lora_b

peft = pytest.importorskip("peft")

TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = {
    "all-linear": ("all-linear", LLAMA_PROJECTIONS),
    "subset": (("q_proj", "v_proj"), ["q_proj", "v_proj"]),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _randomize_peft_b(peft_model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_ours_saved_loads_in_peft_with_the_same_logits(tiny_llama, input_ids, tmp_path, targets, rslora):
    ours = tiny_llama()
    base_logits = _logits(ours, input_ids)
    add_lora(ours, LoraConfig(r=4, alpha=8.0, dropout=0.05, targets=TARGETS[targets][0], rslora=rslora))
    randomize_lora_b(ours)
    ours.eval()
    expected = _logits(ours, input_ids)
    assert (expected - base_logits).abs().max() > 1e-2
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert written["target_modules"] == sorted(TARGETS[targets][1])
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (4, 8, rslora)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].lora_dropout == 0.05
    assert theirs.peft_config["default"].base_model_name_or_path == "tiny-llama"
    torch.testing.assert_close(_logits(theirs, input_ids), expected, **TOL)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_peft_saved_loads_here_with_the_same_logits(tiny_llama, input_ids, tmp_path, targets, rslora):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[targets][1], use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    _randomize_peft_b(theirs)
    expected = _logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    base_logits = _logits(ours, input_ids)
    paths = load_adapter(ours, tmp_path / "peft")
    assert len(paths) == 2 * len(TARGETS[targets][1])
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(_logits(ours, input_ids), expected, **TOL)
    # Saving it again gives the very keys and shapes peft wrote.
    save_adapter(ours, tmp_path / "again")
    peft_tensors = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    our_tensors = load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}


def test_peft_all_linear_string_loads_here(tiny_llama, input_ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    _randomize_peft_b(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    assert len(load_adapter(ours, tmp_path / "peft")) == 14
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs, input_ids), **TOL)


def test_regex_and_single_layer_targets_select_the_same_layers_in_peft(tiny_llama, input_ids, tmp_path):
    for i, targets in enumerate([r"re:model\.layers\.1\.mlp\.\w+_proj", ("layers.0.self_attn.k_proj",)]):
        ours = tiny_llama()
        paths = add_lora(ours, LoraConfig(r=2, alpha=4.0, dropout=0.0, targets=targets))
        randomize_lora_b(ours)
        save_adapter(ours, tmp_path / str(i))
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / str(i)).eval()
        adapted = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
        assert adapted == set(paths)
        torch.testing.assert_close(_logits(theirs, input_ids), _logits(ours, input_ids), **TOL)


def test_keys_with_adapter_name_or_without_prefix_load_under_any_name(tiny_llama, input_ids, tmp_path):
    ours = tiny_llama()
    add_lora(ours, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    randomize_lora_b(ours)
    expected = _logits(ours, input_ids)
    save_adapter(ours, tmp_path / "plain")
    tensors = load_file(tmp_path / "plain" / ADAPTER_WEIGHTS)
    renamed = {
        k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in tensors.items()
    }
    (tmp_path / "named").mkdir()
    save_file(renamed, tmp_path / "named" / ADAPTER_WEIGHTS)
    (tmp_path / "named" / ADAPTER_CONFIG).write_text((tmp_path / "plain" / ADAPTER_CONFIG).read_text())
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "named", name="other")
    assert adapter_names(fresh) == ["other"]
    torch.testing.assert_close(_logits(fresh, input_ids), expected, **TOL)


def test_load_with_replace_overwrites_the_same_parameters_in_place(tiny_llama, input_ids, tmp_path):
    """Resuming needs this: the optimizer keeps references to the adapter's parameters."""
    source = tiny_llama()
    add_lora(source, LoraConfig(r=4, alpha=16.0, dropout=0.0))
    randomize_lora_b(source)
    save_adapter(source, tmp_path / "saved")
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    before = trainable_parameters(model)
    load_adapter(model, tmp_path / "saved", replace=True)
    after = trainable_parameters(model)
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    torch.testing.assert_close(_logits(model, input_ids), _logits(source, input_ids), **TOL)


def test_load_with_replace_and_another_rank_adds_the_adapter_anew(tiny_llama, input_ids, tmp_path):
    source = tiny_llama()
    add_lora(source, LoraConfig(r=2, alpha=4.0, dropout=0.0, targets=("q_proj",)))
    randomize_lora_b(source)
    save_adapter(source, tmp_path / "saved")
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    load_adapter(model, tmp_path / "saved", replace=True)
    assert len(lora_layers(model)) == 2
    torch.testing.assert_close(_logits(model, input_ids), _logits(source, input_ids), **TOL)
