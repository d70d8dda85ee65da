"""Bad input fails early with a message that names the cause, and leaves the model and the disk unchanged."""

import json
import re

import pytest
import torch
import transformers

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError, StateDictError
from qlorakit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    load_adapter,
    lora_layers,
    save_adapter,
    set_active_adapter,
)
from tests.helpers.lora import randomize_lora_b
from tests.helpers.tiny_llama import tiny_llama_config


def _saved_adapter(model, directory, **config):
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, **config))
    randomize_lora_b(model)
    return save_adapter(model, directory)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    assert not lora_layers(model)
    state = model.state_dict()
    assert state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("r", [0, -1])
def test_non_positive_rank_is_a_config_error(r):
    with pytest.raises(ConfigError, match=r"LoraConfig\.r = "):
        LoraConfig(r=r)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval_is_a_config_error(dropout):
    with pytest.raises(ConfigError, match=r"LoraConfig\.dropout = .*must be in \[0, 1\)"):
        LoraConfig(dropout=dropout)


def test_adapter_for_another_hidden_size_names_layer_and_shapes_and_changes_nothing(tiny_llama, tmp_path):
    _saved_adapter(tiny_llama(), tmp_path / "a")  # hidden size 64
    other = transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=32)).eval()
    before = _snapshot(other)
    expected = "model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 64] but this model expects [4, 32]"
    with pytest.raises(StateDictError, match=re.escape(expected)):
        load_adapter(other, tmp_path / "a")
    _assert_unchanged(other, before)


def test_adapter_with_a_layer_the_model_lacks_names_it_and_changes_nothing(tmp_path):
    config = tiny_llama_config()
    config.num_hidden_layers = 3
    _saved_adapter(transformers.LlamaForCausalLM(config), tmp_path / "deep")
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    before = _snapshot(model)
    expected = r"adapter layer 'model\.layers\.2\.[a-z_.]+' does not exist in this model \(7 of 21 adapter layers"
    with pytest.raises(StateDictError, match=expected):
        load_adapter(model, tmp_path / "deep")
    _assert_unchanged(model, before)


def test_directory_without_config_names_the_missing_file(tiny_llama, tmp_path):
    directory = _saved_adapter(tiny_llama(), tmp_path / "a")
    (directory / ADAPTER_CONFIG).unlink()
    model = tiny_llama()
    with pytest.raises(StateDictError, match="missing adapter_config.json"):
        load_adapter(model, directory)
    assert not lora_layers(model)


def test_pickle_weights_are_never_loaded(tiny_llama, tmp_path):
    directory = _saved_adapter(tiny_llama(), tmp_path / "a")
    (directory / ADAPTER_WEIGHTS).rename(directory / "adapter_model.bin")
    with pytest.raises(StateDictError, match="missing adapter_model.safetensors.*never loads pickle"):
        load_adapter(tiny_llama(), directory)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fan_in_fan_out", True, "fan_in_fan_out = True is not supported"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern = .* is not supported"),
        ("init_lora_weights", "pissa_niter_4", "changes the base weights"),
        ("peft_type", "IA3", "only 'LORA' adapters load"),
    ],
)
def test_unsupported_peft_options_are_refused(tiny_llama, tmp_path, key, value, message):
    directory = _saved_adapter(tiny_llama(), tmp_path / "a")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    (directory / ADAPTER_CONFIG).write_text(json.dumps({**config, key: value}))
    model = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        load_adapter(model, directory)
    assert not lora_layers(model)


def test_unknown_target_lists_the_existing_names_and_changes_nothing(tiny_llama):
    model = tiny_llama()
    before = _snapshot(model)
    existing = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    expected = f"'qkv_proj' matches no linear layer; names that exist: {existing}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        add_lora(model, LoraConfig(targets=("q_proj", "qkv_proj")))
    _assert_unchanged(model, before)


def test_same_adapter_name_twice_is_refused(tiny_llama, tmp_path):
    model = tiny_llama()
    directory = _saved_adapter(model, tmp_path / "a")
    with pytest.raises(ConfigError, match="adapter 'default' already exists on model.layers.0.self_attn.q_proj"):
        add_lora(model, LoraConfig(r=2))
    with pytest.raises(ConfigError, match="adapter 'default' already exists .*pass replace=True"):
        load_adapter(model, directory)
    with pytest.raises(ConfigError, match=r"no adapter named 'nope' in the model; adapters: \['default'\]"):
        set_active_adapter(model, "nope")


def test_save_into_a_non_empty_directory_needs_overwrite(tiny_llama, tmp_path):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty; pass overwrite=True"):
        save_adapter(model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    save_adapter(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_save_into_an_empty_directory_is_allowed(tiny_llama, tmp_path):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2))
    (tmp_path / "empty").mkdir()
    save_adapter(model, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_a_save_that_fails_midway_keeps_the_old_adapter_and_a_killed_one_is_cleaned_at_the_next_start(
    tiny_llama, tmp_path, monkeypatch
):
    import os

    from qlorakit.fileio import remove_stale
    from qlorakit.lora import peft_io

    model = tiny_llama()
    add_lora(model, LoraConfig(r=2))
    target = tmp_path / "out"
    save_adapter(model, target)
    before = (target / ADAPTER_WEIGHTS).read_bytes()
    staged: list[str] = []

    def dies_after_the_config(tensors, path, metadata=None):
        staged.append(os.path.basename(os.path.dirname(os.path.dirname(path))))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft_io, "save_file", dies_after_the_config)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, target, overwrite=True)
    assert (target / ADAPTER_WEIGHTS).read_bytes() == before  # the old adapter, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # its staging directory removed
    # the staging name is fileio's .<name>.tmp-<pid>: what a SIGKILLed save leaves, remove_stale removes
    assert staged == [f".out.tmp-{os.getpid()}"]
    (tmp_path / ".out.tmp-999999999").mkdir()  # a dead process's
    assert remove_stale(tmp_path) == [".out.tmp-999999999"]
