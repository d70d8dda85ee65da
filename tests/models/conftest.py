"""Fixtures for the model-loading tests: tiny saved checkpoints and the shared SmolLM2 GGUF."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from tests.helpers import tiny_models

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """``saved_model(arch, shard=None) -> directory``: a tiny random model saved once per session."""
    cache: dict[tuple[str, str | None], Path] = {}

    def get(arch: str, shard: str | None = None) -> Path:
        if (arch, shard) not in cache:
            directory = tmp_path_factory.mktemp(f"{arch}-{shard or 'single'}")
            cache[(arch, shard)] = tiny_models.save(tiny_models.make_model(arch), directory, shard)
        return cache[(arch, shard)]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf(shared_dir) -> Path:
    """The shared SmolLM2 GGUF, checked against its published sha256."""
    path = shared_dir / "models" / "smollm2-135m-instruct" / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    assert digest.hexdigest() == SMOLLM2_SHA256
    return path


@pytest.fixture(scope="session")
def seeded_cache(tmp_path_factory, smollm2_gguf) -> Path:
    """A qlorakit cache holding the SmolLM2 alias, installed from the shared file (no network)."""
    from qlorakit.models import seed_cache

    root = tmp_path_factory.mktemp("qlorakit-cache")
    seed_cache("smollm2-135m-instruct", smollm2_gguf, root)
    return root
