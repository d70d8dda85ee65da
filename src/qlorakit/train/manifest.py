"""A checkpoint's ``manifest.json``: every file's size and sha256, written last, checked before a resume.

A power cut can leave a renamed checkpoint whose files never reached the disk (empty, truncated or zeroed
pages) if the writer did not fsync; the manifest lets ``--resume`` tell such a checkpoint from a good one
instead of trusting it. ``{"format": 1, "files": {"<relative path>": {"size": <bytes>, "sha256": "<hex>"}}}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> dict:
    """Describe every file under ``directory`` in ``<directory>/manifest.json`` (call it after the last file)."""
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(directory)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why it cannot be read)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, f"{MANIFEST}: missing"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{MANIFEST}: unreadable ({type(exc).__name__}: {exc}; {path.stat().st_size} bytes)"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST}: not a qlorakit manifest (no 'files' mapping)"
    return manifest, None


def verify(directory: Path) -> list[str]:
    """Every way ``directory`` differs from its manifest, as ``<file>: expected ..., found ...`` lines.

    An empty list: the directory verifies.
    """
    manifest, problem = read_manifest(directory)
    if manifest is None:
        return [problem]
    problems = []
    for name, want in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: expected {want['size']:,} bytes, found no file")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: expected {want['size']:,} bytes, found {size:,}")
            continue
        digest = sha256_file(path)
        if digest != want["sha256"]:
            problems.append(f"{name}: expected sha256 {want['sha256'][:16]}..., found {digest[:16]}... (same size)")
    return problems


def manifest_bytes(directory: Path) -> int:
    """Total size of the files a verified checkpoint holds (0 without a readable manifest)."""
    manifest, _ = read_manifest(directory)
    return sum(int(f["size"]) for f in manifest["files"].values()) if manifest else 0
