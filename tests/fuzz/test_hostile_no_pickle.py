"""No pickle anywhere in the package: no module that unpickles is imported and no loader is called with it.

The scan walks the AST of every module under ``src/qlorakit`` (docstrings that say "never pickle" do
not count) and fails on an import of a pickling module, a call of ``torch.load`` / ``torch.jit.load`` /
``numpy.load`` / ``pandas.read_pickle``, or a keyword that turns unpickling on.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qlorakit
from qlorakit.models.source import HUB_PATTERNS

PACKAGE = Path(qlorakit.__file__).parent
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}
#: Calls that unpickle (or may), by their dotted name as written with the usual aliases.
UNPICKLING_CALLS = {"torch.load", "torch.jit.load", "torch.serialization.load", "np.load", "numpy.load",
                    "pd.read_pickle", "pandas.read_pickle"}
#: Keyword arguments that turn unpickling on.
UNSAFE_KEYWORDS = {("allow_pickle", True), ("weights_only", False), ("use_safetensors", False)}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every pickle use in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in UNPICKLING_CALLS:
                found.append(f"{where}: {name}(...)")
            for keyword in node.keywords:
                value = keyword.value.value if isinstance(keyword.value, ast.Constant) else None
                if (keyword.arg, value) in UNSAFE_KEYWORDS:
                    found.append(f"{where}: {name}(..., {keyword.arg}={value})")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "from dill import loads", "import torch\ntorch.load('x.bin')", "np.load(f, allow_pickle=True)",
    "torch.load(f, weights_only=False)", "AutoModel.from_pretrained(p, use_safetensors=False)",
])
def test_the_scan_finds_each_kind_of_pickle_use(snippet):
    assert pickle_uses(snippet)


def test_the_package_never_unpickles():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the scan sees the whole package
    found = [use for module in modules for use in pickle_uses(module.read_text(encoding="utf-8"), str(module))]
    assert found == []


def test_hub_downloads_fetch_no_pickle_files():
    pickle_globs = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.pickle", "*.msgpack", "*.h5")
    assert not [p for p in HUB_PATTERNS if p in pickle_globs or p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
