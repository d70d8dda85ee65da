"""``qlorakit.fileio``: durable writes (fsync the file, rename, fsync the directory) and stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlorakit import fileio


def _record(monkeypatch) -> list[tuple[str, str]]:
    """Record every fsync (of which path) and rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    paths: dict[int, str] = {}
    real_open = os.open

    def opened(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        paths[fd] = os.fspath(path)
        return fd

    def fsync(fd):
        events.append(("fsync", os.path.basename(paths.get(fd, f"fd {fd}")) or "?"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(os.fspath(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_text_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    fileio.write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert [e for e, _ in events] == ["fsync", "rename", "fsync"]
    assert events[1:] == [("rename", "config.yaml"), ("fsync", tmp_path.name)]
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n" and os.listdir(tmp_path) == ["config.yaml"]


def test_a_directory_write_fsyncs_every_file_before_the_rename_and_replaces_the_old_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    events = _record(monkeypatch)
    points = []

    def fill(directory):
        (directory / "sub").mkdir()
        (directory / "a.bin").write_bytes(b"a")
        (directory / "sub" / "b.bin").write_bytes(b"b")

    fileio.write_dir_atomic(target, fill, at=points.append)
    assert points == list(fileio.WRITE_POINTS)
    first_rename = next(i for i, (e, _) in enumerate(events) if e == "rename")
    assert {name for e, name in events[:first_rename]} >= {"a.bin", "b.bin", "sub", "out"}  # all fsynced first
    assert [name for e, name in events[first_rename:] if e == "rename"] == [f".out.old-{os.getpid()}", "out"]
    assert events[-1] == ("fsync", tmp_path.name)
    assert sorted(p.name for p in target.rglob("*")) == ["a.bin", "b.bin", "sub"] and os.listdir(tmp_path) == ["out"]


def test_a_failed_fill_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("keep")

    def fill(directory):
        (directory / "half.bin").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fileio.write_dir_atomic(target, fill)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["keep.txt"]


def test_remove_stale_deletes_temporaries_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".checkpoint-3.tmp-{dead_pid}").mkdir()
    (tmp_path / f".metrics.jsonl.tmp-{dead_pid}").write_text("{}")
    (tmp_path / f".adapter.old-{dead_pid}").mkdir()
    (tmp_path / f".checkpoint-4.tmp-{os.getpid()}").mkdir()  # this process: still writing it
    (tmp_path / "checkpoint-2").mkdir()
    removed = fileio.remove_stale(tmp_path)
    expected = [f".adapter.old-{dead_pid}", f".checkpoint-3.tmp-{dead_pid}", f".metrics.jsonl.tmp-{dead_pid}"]
    assert removed == sorted(expected)
    assert sorted(os.listdir(tmp_path)) == sorted([f".checkpoint-4.tmp-{os.getpid()}", "checkpoint-2"])
