"""Names that come from files or users cannot make qlorakit write (or read) outside the chosen directory.

An adapter name is one plain path component (PEFT saves a named adapter under ``<dir>/<name>/``); the
shards an index names must lie in the model directory; and an export's output directory is never one
whose replacement would delete something else (``.``, ``..``, a root, a symlink, the merge's inputs).
"""

from __future__ import annotations

import copy
import json

import pytest
import seed_files as seeds

from qlorakit.cli.main import main
from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError, ModelLoadError
from qlorakit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, load_adapter, lora_layers, save_adapter
from qlorakit.models.checkpoint import open_checkpoint
from qlorakit.models.export import check_output_dir

BAD_NAMES = ["../escape", "a/b", "/abs/path", "..", ".", "a\\b", "nul\x00byte", "", "x" * 300]


@pytest.fixture()
def adapted():
    model = copy.deepcopy(seeds.tiny_model())
    add_lora(model, LoraConfig(r=2, alpha=4.0, dropout=0.0, targets=("q_proj",)))
    return model


@pytest.mark.parametrize("name", BAD_NAMES)
def test_save_refuses_an_adapter_name_that_is_not_a_plain_name(adapted, tmp_path, name):
    with pytest.raises(ConfigError, match="adapter name"):
        save_adapter(adapted, tmp_path / "out" / "adapter", name=name)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_refuses_an_adapter_name_that_is_not_a_plain_name(adapted, tmp_path, name):
    directory = save_adapter(adapted, tmp_path / "adapter")
    model = copy.deepcopy(seeds.tiny_model())
    with pytest.raises(ConfigError, match="adapter name"):
        load_adapter(model, directory, name=name)
    assert not lora_layers(model)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "..", "sub/model.safetensors"])
def test_an_index_cannot_name_a_shard_outside_the_model_directory(tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes(seeds.safetensors_seed(0))
    directory = tmp_path / "model"
    (directory / "sub").mkdir(parents=True)
    (directory / "sub" / "model.safetensors").write_bytes(seeds.safetensors_seed(0))
    weight_map = {"a.weight": shard, "b.bias": shard, "c.step": shard}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=r"key 'weight_map', tensor 'a\.weight': shard .* plain name"):
        open_checkpoint(directory)


@pytest.mark.parametrize("out", [".", "..", "", "/", "model/.."])
def test_an_output_directory_without_a_name_of_its_own_is_refused(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="names no directory of its own"):
        check_output_dir(out)


def test_an_output_directory_that_is_a_symlink_or_holds_an_input_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="symbolic link"):
        check_output_dir(tmp_path / "link")
    adapter = tmp_path / "runs" / "adapter"
    adapter.mkdir(parents=True)
    for out in (adapter, tmp_path / "runs"):
        with pytest.raises(ConfigError, match="is or contains the input"):
            check_output_dir(out, inputs=[tmp_path / "model", adapter])
    assert check_output_dir(tmp_path / "merged", inputs=[adapter]) == tmp_path / "merged"


def test_merge_into_its_own_adapter_directory_fails_before_loading_and_keeps_the_adapter(
        adapted, tmp_path, capsys):
    adapter = save_adapter(adapted, tmp_path / "adapter")
    before = {f: (adapter / f).read_bytes() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    code = main(["merge", "--model", str(tmp_path / "no-such-model"), "--adapter", str(adapter),
                 "--output", str(adapter), "--overwrite"])
    assert code == 2 and "is or contains the input" in capsys.readouterr().err
    assert {f: (adapter / f).read_bytes() for f in before} == before
