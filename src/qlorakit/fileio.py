"""Durable writes: a crash or a power cut never leaves a result half-written (imports nothing heavy).

Atomic alone (write a temporary file, rename it over the target) survives a killed process, but not a
power cut or a kernel crash: the rename can reach the disk before the file's data, leaving an empty or
truncated file under the final name. Every writer here therefore follows the full sequence

    write <dir>/.<name>.tmp-<pid>  ->  fsync(file)  ->  rename over <dir>/<name>  ->  fsync(<dir>)

so that once a writer returns, the new content is on the disk under its final name, and before that the
old content (or nothing) is. Directories are written the same way (``staging_dir`` -> ``fsync_tree`` ->
``replace_dir``, or ``write_dir_atomic`` for all three). Temporary names carry the writer's PID;
``remove_stale`` deletes those whose process is gone (a killed run leaves them behind).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``.<name>.tmp-<pid>`` (being written) and ``.<name>.old-<pid>`` (being deleted): what a killed writer leaves.
STALE_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")

#: The moments of ``write_dir_atomic`` at which its ``at`` callback runs, in order.
WRITE_POINTS = ("after-files-before-fsync", "after-fsync-before-rename", "after-rename")


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush ``path`` (a file or a directory) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (``root`` last), so a rename of ``root`` is durable."""
    for directory, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """``<dir>/.<name>.<kind>-<pid>``: this process's temporary (``tmp``) or doomed (``old``) sibling."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` durably (temp file, fsync, rename, fsync of the directory)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)
    return out


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` durably; parent directories are created."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` durably."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_figure_atomic(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure to ``path`` durably (the format follows the suffix)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    return write_bytes_atomic(path, buffer.getvalue())


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A fresh, empty ``<dir>/.<name>.tmp-<pid>`` to build ``target`` in (``replace_dir`` moves it into place)."""
    tmp = temp_name(Path(target))
    if tmp.exists():
        _delete(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename the (already fsynced) directory ``staged`` to ``target``, replacing it, and fsync the parent.

    An existing ``target`` is first renamed to ``.<name>.old-<pid>`` and deleted only after the new one is
    in place, so at every moment the final name holds either the old or the new directory, whole.
    """
    target = Path(target)
    old = temp_name(target, "old") if target.exists() else None
    if old is not None:
        if old.exists():
            _delete(old)
        os.replace(target, old)
    os.replace(staged, target)
    fsync_path(target.parent)
    if old is not None:
        _delete(old)
    return target


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_dir_atomic(
    target: str | os.PathLike[str], fill: Callable[[Path], None], at: Callable[[str], None] | None = None
) -> Path:
    """Build directory ``target`` durably: ``fill(d)`` writes the files into an empty staging directory ``d``,
    then every file is fsynced, ``d`` is renamed to ``target`` (replacing it) and the parent is fsynced.

    Any failure (or a KeyboardInterrupt) removes the staging directory and leaves ``target`` as it was.
    ``at(point)`` is called at each of ``WRITE_POINTS`` (the fault-injection hook of the tests).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    at = at or (lambda point: None)
    staged = staging_dir(target)
    try:
        inner = staged / target.name
        inner.mkdir()
        fill(inner)
        at(WRITE_POINTS[0])
        fsync_tree(inner)
        at(WRITE_POINTS[1])
        replace_dir(inner, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    at(WRITE_POINTS[2])
    return target


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a directory so that no half-deleted copy is ever left under its name (rename first, then delete)."""
    doomed = temp_name(Path(path), "old")
    os.replace(path, doomed)
    fsync_path(doomed.parent)
    _delete(doomed)


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: str | os.PathLike[str]) -> list[str]:
    """Delete the temporary entries (``STALE_RE``) in ``directory`` whose writer's process is gone; their names."""
    directory = Path(directory)
    removed = []
    for child in sorted(directory.iterdir()) if directory.is_dir() else []:
        match = STALE_RE.match(child.name)
        if match and not pid_alive(int(match.group(1))):
            _delete(child)
            removed.append(child.name)
    return removed
