"""A model's own Python code runs only when the user passes ``trust_remote_code=True``.

Every function on the load path defaults to False and passes the value on unchanged; the CLI flags
default to off; and a model directory whose ``config.json`` points at code of its own (``auto_map``)
is loaded without importing that code (a marker file the code would write never appears).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import transformers

from qlorakit.cli.main import build_parser
from qlorakit.errors import ModelLoadError
from qlorakit.models import load_model
from qlorakit.models.build import build_empty_model, load_config
from qlorakit.models.inspect import inspect_source
from qlorakit.models.source import resolve_source
from qlorakit.planner.shapes import model_shape, read_config

LOAD_PATH = (load_model, load_config, build_empty_model, inspect_source, model_shape, read_config)
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
EVIL_CODE = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('remote code ran')\n"


@pytest.mark.parametrize("function", LOAD_PATH, ids=lambda f: f.__qualname__)
def test_every_load_function_defaults_to_no_remote_code(function):
    assert inspect.signature(function).parameters["trust_remote_code"].default is False


@pytest.mark.parametrize("argv", [["inspect", "some-model"], ["plan", "--model", "7b"]])
def test_the_cli_flag_defaults_to_off(argv):
    assert build_parser().parse_args(argv).trust_remote_code is False


def _model_dir(tmp_path, config):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil", "modeling_evil"):
        (directory / f"{module}.py").write_text(EVIL_CODE)
    return directory


AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}


def test_a_model_that_ships_code_of_an_unknown_type_is_refused_without_running_it(tmp_path):
    directory = _model_dir(tmp_path, {"model_type": "evil-remote", "auto_map": AUTO_MAP})
    for load in (load_model, inspect_source, model_shape):
        with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
            load(directory)
    assert not (directory / "RAN").exists()


def test_a_known_type_with_an_auto_map_is_built_from_transformers_own_code(tmp_path, monkeypatch):
    directory = _model_dir(tmp_path, {**TINY_LLAMA, "auto_map": AUTO_MAP})
    seen = []
    entry_points = ((transformers.AutoConfig, "from_pretrained"), (transformers.AutoModelForCausalLM, "from_config"))
    for cls, method in entry_points:
        original = getattr(cls, method)

        def record(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, method, record)
    model = build_empty_model(load_config(resolve_source(directory)), compute_dtype=torch.float32)
    model_shape(directory)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert seen and all(value is False for value in seen)
    assert not (directory / "RAN").exists()
