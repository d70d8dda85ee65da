"""Bad model sources fail with a ModelLoadError that names the cause — before the model is built."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qlorakit.errors import ModelLoadError
from qlorakit.models import load_model, resolve_source
from qlorakit.models import loader as loader_module


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if load_model gets as far as building the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built although the source is invalid")

    monkeypatch.setattr(loader_module, "build_empty_model", refuse)


def _copy(saved, tmp_path, name="model"):
    return shutil.copytree(saved, tmp_path / name)


def test_missing_shard_named_by_the_index(saved_model, tmp_path, no_build):
    directory = _copy(saved_model("llama", "40KB"), tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"names shard\(s\) \['{shard.name}'\].*incomplete"):
        load_model(directory)


def test_truncated_safetensors_file_is_named(saved_model, tmp_path, no_build):
    directory = _copy(saved_model("llama"), tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=rf"truncated safetensors file {path}"):
        load_model(directory)


def test_truncated_shard_is_named(saved_model, tmp_path, no_build):
    directory = _copy(saved_model("llama", "40KB"), tmp_path)
    shard = min(directory.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(ModelLoadError, match=rf"truncated safetensors file {shard}"):
        load_model(directory)


def test_unknown_model_type_says_transformers_does_not_know_it(saved_model, tmp_path, no_build):
    directory = _copy(saved_model("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama-from-the-future"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model_type 'llama-from-the-future'.*does not know.*trust_remote_code"):
        load_model(directory)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist: pass a local directory"):
        load_model(tmp_path / "no-such-model")


def test_tensor_missing_from_checkpoint_is_listed(saved_model, tmp_path):
    directory = _copy(saved_model("llama"), tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for quant in ("default", None):
        kwargs = {} if quant == "default" else {"quant": None}
        with pytest.raises(
            ModelLoadError, match=r"2 tensor\(s\).*model\.layers\.1\.mlp\.up_proj\.weight.*model\.norm\.weight"
        ):
            load_model(directory, **kwargs)


def test_weights_of_another_shape_are_rejected(saved_model, tmp_path):
    directory = _copy(saved_model("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 80
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight.*shape.*different models"):
        load_model(directory)


def test_directory_without_model_files(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=r"neither model\.safetensors.*pickle \.bin checkpoints are not read"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json and no \.gguf file"):
        resolve_source(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf model"):
        resolve_source(path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelLoadError, match=r"does not start with the GGUF magic"):
        load_model(fake)


def test_eight_bit_checkpoint_is_refused(saved_model, tmp_path):
    directory = _copy(saved_model("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"8-bit bitsandbytes"):
        resolve_source(directory)


def test_hub_id_offline_says_the_hub_is_unreachable(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelLoadError, match=r"Hub is unreachable.*pass its local directory"):
        load_model("acme-org/tiny-model")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"[" * 100_000, r"config\.json:1: not valid JSON \(arrays or objects nested deeper than"),
        (b'{"vocab_size": ' + b"9" * 5000 + b"}", r"config\.json:1: not valid JSON \(an integer too long"),
        (b'{"model_type": "llama",\n "x": \xff}', r"config\.json:2: not valid UTF-8"),
        (b'{"model_type": "llama",\n "x": }', r"config\.json:2: not valid JSON"),
    ],
)
def test_hostile_config_json_is_a_model_load_error_with_its_line(saved_model, tmp_path, no_build, content, why):
    directory = _copy(saved_model("llama"), tmp_path)
    (directory / "config.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match=why):
        load_model(directory)

