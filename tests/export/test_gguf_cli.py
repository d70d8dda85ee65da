"""``qlorakit export gguf`` / ``gguf-adapter`` end to end on a tiny llama GGUF, and their refusals, which all
come before the model is loaded (except an adapter for another base, which needs the base's shapes)."""

from __future__ import annotations

import pytest

from qlorakit.cli.main import main
from qlorakit.config import LoraConfig
from qlorakit.lora import save_adapter
from qlorakit.models import load_model
from qlorakit.models.gguf_reader import read_gguf_header
from tests.helpers import tiny_models
from tests.helpers.gguf_files import write_tiny_llama_gguf
from tests.helpers.lora import randomize_lora_b


@pytest.fixture()
def base_and_adapter(tmp_path):
    base = write_tiny_llama_gguf(tmp_path / "base.gguf")
    model = load_model(base, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora_b(model)
    return base, save_adapter(model, tmp_path / "adapter")


def _export(*args: str) -> int:
    return main(["export", *args, "--no-progress"])


def test_export_gguf_writes_the_file_and_a_modelfile(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "out.q8_0.gguf"
    assert _export("gguf", "--model", str(base), "--adapter", str(adapter), "--output", str(out), "--type", "q8_0") == 0
    printed = capsys.readouterr().out
    assert "merged 14 adapted layers" in printed and "loaded in NF4" in printed
    assert read_gguf_header(out).metadata["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (tmp_path / "out.q8_0.gguf.Modelfile").read_text().splitlines()[1] == "FROM ./out.q8_0.gguf"
    assert _export("gguf", "--model", str(base), "--output", str(out)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_export_gguf_adapter_writes_a_lora_and_a_modelfile_on_the_base(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "lora.gguf"
    assert _export("gguf-adapter", "--model", str(base), "--adapter", str(adapter), "--output", str(out)) == 0
    assert "14 LoRA layers, r=4, adapter.lora.alpha=8" in capsys.readouterr().out
    assert read_gguf_header(out).metadata["general.type"] == "adapter"
    lines = (tmp_path / "lora.gguf.Modelfile").read_text().splitlines()
    assert lines[1] == f"FROM {base.resolve()}" and lines[2] == "ADAPTER ./lora.gguf"


@pytest.mark.parametrize(("args", "message"), [
    (["--type", "q4_k_m"], "llama-quantize in.gguf out.gguf Q4_K_M"),
    (["--type", "q4_0", "--adapter", "missing-dir"], "adapter directory missing-dir does not exist"),
])  # fmt: skip
def test_bad_type_or_adapter_is_refused_before_loading(base_and_adapter, tmp_path, capsys, monkeypatch, args, message):
    base, _ = base_and_adapter
    monkeypatch.setattr("qlorakit.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert _export("gguf", "--model", str(base), "--output", str(tmp_path / "o.gguf"), *args) == 2
    assert message in capsys.readouterr().err


def test_architecture_without_a_gguf_mapping_is_refused_before_loading(tmp_path, capsys):
    directory = tiny_models.save(tiny_models.make_model("gemma"), tmp_path / "gemma")
    assert _export("gguf", "--model", str(directory), "--output", str(tmp_path / "o.gguf")) == 2
    assert "'gemma' has no GGUF mapping in qlorakit; supported: llama, mistral, qwen2" in capsys.readouterr().err


def test_adapter_for_another_base_is_refused(tmp_path, capsys):
    base = write_tiny_llama_gguf(tmp_path / "base.gguf")
    other = tiny_models.make_model("llama", hidden_size=32)
    from qlorakit.lora import add_lora

    add_lora(other, LoraConfig(r=4, alpha=8))
    save_adapter(other, tmp_path / "other")
    assert _export("gguf-adapter", "--model", str(base), "--adapter", str(tmp_path / "other"),
                   "--output", str(tmp_path / "o.gguf")) == 2
    assert "made for another base model" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()
