"""Fixtures of the GGUF export tests: the shared SmolLM2 with a trained (random, non-zero B) adapter, its f32
export made once per session, and tiny llama GGUFs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf")

SMOLLM2 = Path("models") / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A fixed prompt of SmolLM2 token ids (BOS-free, as its tokenizer has add_bos_token False).
PROMPT_IDS = [504, 3458, 314, 260, 1345, 28, 357, 3255, 282, 260, 1789, 314]


@pytest.fixture(scope="session")
def smollm2_path(shared_dir) -> Path:
    path = shared_dir / SMOLLM2
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def smollm2_trained(smollm2_path, tmp_path_factory):
    """(model with adapter "default" active, adapter directory): SmolLM2 in fp32 with an r=8 adapter whose B
    is random (std 0.02), so the adapter changes every logit."""
    from qlorakit.config import LoraConfig
    from qlorakit.lora import save_adapter
    from qlorakit.models import load_model
    from tests.helpers.lora import randomize_lora_b

    model = load_model(smollm2_path, quant=None, lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    randomize_lora_b(model, std=0.02)
    adapter = save_adapter(model, tmp_path_factory.mktemp("smollm2-adapter") / "adapter")
    return model, adapter


@pytest.fixture(scope="session")
def smollm2_f32_export(smollm2_trained, smollm2_path, tmp_path_factory) -> Path:
    """The merged SmolLM2 written once as an f32 GGUF."""
    from qlorakit.export import export_gguf
    from qlorakit.models import resolve_source

    out = tmp_path_factory.mktemp("smollm2-gguf") / "merged.f32.gguf"
    export_gguf(smollm2_trained[0], resolve_source(smollm2_path), out, "f32", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_path):
    from qlorakit.export.gguf_meta import read_source_metadata

    return read_source_metadata(smollm2_path)


@pytest.fixture()
def tiny_trained(tmp_path):
    """(source, model with a random adapter on an NF4 base) for a tiny llama GGUF in ``tmp_path``."""
    from qlorakit.config import LoraConfig
    from qlorakit.models import load_model, resolve_source
    from tests.helpers.gguf_files import write_tiny_llama_gguf
    from tests.helpers.lora import randomize_lora_b

    source = resolve_source(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    model = load_model(source, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora_b(model, std=0.3)
    return source, model
