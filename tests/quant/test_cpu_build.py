"""The C sources of the CPU backend: shipped as package data, hashed into the cache key, and declared by a
``Prototype`` table that agrees with them (``quant/backends/cpu_build.py``, ``cpu_native.py``)."""

import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from qlorakit.quant.backends import cpu_build, cpu_native

REPO = Path(__file__).resolve().parents[2]


def test_c_sources_are_package_data_found_by_importlib_resources():
    folder = resources.files("qlorakit.quant") / "csrc"
    shipped = sorted(p.name for p in folder.iterdir() if p.name.endswith((".c", ".h")))
    assert shipped == sorted(cpu_build.SOURCES)  # every source is compiled, none is left out
    sources = cpu_build.read_sources()
    assert list(sources) == list(cpu_build.SOURCES)
    assert all(sources[name] == (folder / name).read_text(encoding="utf-8") for name in shipped)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qlorakit"]
    for name in shipped:  # the wheel carries them (qlorakit is the package the patterns are relative to)
        assert any(fnmatch.fnmatch(f"quant/csrc/{name}", pattern) for pattern in patterns), name


def test_cache_key_changes_with_the_source_text_the_flags_and_the_cpu():
    sources = cpu_build.read_sources()
    key = cpu_build.cache_key(sources, cpu_build.CFLAGS, "x86_64 avx2")
    assert key == cpu_build.cache_key(dict(sources), list(cpu_build.CFLAGS), "x86_64 avx2")  # deterministic
    edited = {**sources, "gemv4bit.c": sources["gemv4bit.c"] + "\n/* an edit */\n"}
    assert cpu_build.cache_key(edited, cpu_build.CFLAGS, "x86_64 avx2") != key
    assert cpu_build.cache_key(sources, (*cpu_build.CFLAGS, "-g"), "x86_64 avx2") != key
    assert cpu_build.cache_key(sources, cpu_build.CFLAGS, "x86_64 avx2 avx512f") != key
    assert len(key) == 16 and int(key, 16) >= 0


def test_prototype_table_matches_the_c_source():
    sources = cpu_build.read_sources()
    cpu_build.check_prototypes(cpu_native.PROTOTYPES, sources)  # raises on any difference
    exported = cpu_build.exported_functions(sources)
    assert sorted(exported) == sorted(p.name for p in cpu_native.PROTOTYPES)
    assert "block_scale" not in exported and "dequant_any" not in exported  # static helpers are not exported
    assert [name for name, _ in exported["gemv_f32"].args] == ["x", "w", "y", "out", "in"]


@pytest.mark.parametrize(
    "edit",
    [
        ("void gemv_f32(const float* x,", "void gemv_f32(const float* xs,"),  # an argument renamed
        ("int64_t out, int64_t in) {", "int64_t out, float in) {"),  # an argument's type changed
        ("void gemv_f32(", "void gemv_fp32("),  # a function renamed
        ("void gemv_f32(", "void gemv_extra(void* p) {}\nvoid gemv_f32("),  # a function added
    ],
    ids=["argument-name", "argument-type", "function-name", "extra-function"],
)
def test_prototype_check_rejects_a_source_that_differs(edit):
    sources = cpu_build.read_sources()
    old, new = edit
    assert old in sources["gemv_dense.c"]
    edited = {**sources, "gemv_dense.c": sources["gemv_dense.c"].replace(old, new, 1)}
    with pytest.raises(RuntimeError, match="cpu_native.PROTOTYPES"):
        cpu_build.check_prototypes(cpu_native.PROTOTYPES, edited)
