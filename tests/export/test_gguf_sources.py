"""GGUF export from a Hugging Face directory (hyper-parameters from config.json, tokenizer from tokenizer.json)
and the Ollama Modelfile.

The HF directory is a tiny random llama with SmolLM2's tokenizer saved beside it (transformers' conversion
of the shared GGUF's vocabulary): its export must carry the same tokens, merges, token types, special ids,
chat template and pre-tokenizer name as the GGUF that tokenizer came from, and load back with equal logits.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.errors import ConfigError
from qlorakit.export import export_gguf, write_modelfile
from qlorakit.export.gguf_meta import read_source_metadata
from qlorakit.export.modelfile import modelfile_text
from qlorakit.models import load_model, load_tokenizer, resolve_source

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.chat_template")  # fmt: skip


@pytest.fixture(scope="module")
def hf_smol_dir(smollm2_path, save_tiny_llama):
    return save_tiny_llama("hf-smol", tokenizer=load_tokenizer(smollm2_path), vocab_size=49152)


def test_hf_source_export_carries_the_tokenizer_and_loads_back(hf_smol_dir, smollm2_metadata, tmp_path):
    model = load_model(hf_smol_dir, quant=None)
    out = export_gguf(model, resolve_source(hf_smol_dir), tmp_path / "hf.gguf", "f32", progress=False).path
    written = read_source_metadata(out)
    for key in TOKENIZER_KEYS:
        assert written[key][0] == smollm2_metadata[key][0], key
    assert written["llama.attention.head_count_kv"][0] == 2 and written["llama.rope.dimension_count"][0] == 16
    ids = torch.tensor([[5, 900, 17, 4000, 2]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out, quant=None)(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_each_supported_architecture_round_trips_through_transformers_gguf_reader(arch, smol_tokenizer, tmp_path,
                                                                                   monkeypatch):
    """Names, q/k permutation (llama, mistral), q/k/v biases (qwen2) and hyper-parameters, read back by the
    GGUF loader that qlorakit shares with transformers; logits equal in fp32 (1e-5).

    Under a qwen2 config transformers loads SmolLM2's tokenizer.json as a Qwen2Tokenizer with Qwen2's own
    pre-tokenizer, whose hash the export rightly does not take for smollm's; that case names it qwen2."""
    from tests.helpers import tiny_models

    if arch == "qwen2":
        monkeypatch.setattr("qlorakit.export.gguf_meta.pre_tokenizer", lambda tokenizer: "qwen2")

    directory = tiny_models.save(tiny_models.make_model(arch, vocab_size=49152), tmp_path / f"tiny-{arch}")
    smol_tokenizer.save_pretrained(directory)
    model = load_model(directory, quant=None)
    out = export_gguf(model, resolve_source(directory), tmp_path / f"{arch}.gguf", "f32", progress=False).path
    ids = torch.tensor([[5, 900, 17, 4000, 2, 77]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out, quant=None)(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_hf_source_without_a_bpe_tokenizer_json_is_refused(save_tiny_llama, tmp_path):
    directory = save_tiny_llama("no-tokenizer")
    (directory / "tokenizer.model").write_bytes(b"spm")
    model = load_model(directory, quant=None)
    with pytest.raises(ConfigError, match="only a SentencePiece tokenizer.model"):
        export_gguf(model, resolve_source(directory), tmp_path / "x.gguf", "f32", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf.tmp-*"))


def test_chatml_modelfile_has_the_go_template_system_prompt_and_stops(smollm2_metadata, tmp_path):
    template = smollm2_metadata["tokenizer.chat_template"][0]
    path = write_modelfile(tmp_path / "m.gguf", template, "<|im_end|>")
    assert path.name == "m.gguf.Modelfile"
    text = path.read_text()
    assert text.splitlines()[1] == "FROM ./m.gguf"
    chatml = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    assert chatml in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|im_start|>"' in text


def test_adapter_modelfile_points_at_the_base_and_the_adapter(tmp_path):
    template = "{{ '[INST] ' + m + ' [/INST]' }}"
    path = write_modelfile(tmp_path / "a.gguf", template, "</s>", base_gguf=tmp_path / "b.gguf")
    lines = path.read_text().splitlines()
    assert lines[1] == f"FROM {(tmp_path / 'b.gguf').resolve()}" and lines[2] == "ADAPTER ./a.gguf"
    assert any(line.startswith('TEMPLATE """{{- range $i, $m := .Messages }}') for line in lines)


def test_unknown_template_family_gets_no_template_but_says_why():
    text = modelfile_text("./m.gguf", "{% for m in messages %}<turn>{{ m.content }}{% endfor %}", "<end>")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "# no TEMPLATE" in text
    assert 'PARAMETER stop "<end>"' in text
