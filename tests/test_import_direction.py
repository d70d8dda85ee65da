"""The packages of qlorakit import one way (docs/design.md, "Layout and import direction").

Each package may import only the packages listed for it here; the base modules (constants, errors,
untrusted, fileio, hardware, config_fields, config) import nothing heavier than the ones listed. A new edge
that is not in this table fails the test, so a cycle or an upward import is a deliberate, documented change.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qlorakit"
BASE = {"constants", "errors", "untrusted"}

#: package -> the qlorakit packages (or top-level modules) it may import.
ALLOWED: dict[str, set[str]] = {
    "constants": set(),
    "errors": set(),
    "fileio": set(),
    "hardware": BASE,
    "config_fields": BASE,
    "config": BASE | {"config_fields"},
    "quant": BASE | {"hardware", "fileio"},
    "optim": BASE | {"quant"},
    "lora": BASE | {"config", "fileio", "quant"},
    "untrusted": {"errors"},
    "models": BASE | {"config", "fileio", "quant", "lora"},
    "export": BASE | {"config", "fileio", "quant", "lora", "models"},
    "data": BASE | {"config"},
    "generate": BASE | {"quant", "lora"},
    "eval": BASE | {"config", "fileio", "lora", "models"},
    "parallel": BASE | {"config", "quant", "lora", "optim"},
    "train": BASE | {"config", "fileio", "hardware", "quant", "lora", "optim", "data", "parallel"},
    "planner": BASE | {"config", "hardware", "quant", "lora", "models", "optim"},
    "serve": BASE | {"generate", "lora"},
    "cli": None,  # may import everything; nothing imports cli
    "__main__": {"cli"},
    "__init__": set(),
}


def _imported_packages(path: Path) -> set[str]:
    """The top-level qlorakit names (``quant``, ``config``, ...) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "qlorakit" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_package_imports_only_what_the_design_allows():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = _package_of(path)
        assert package in ALLOWED, f"{path}: package {package!r} is not in the import table (add it, and to design.md)"
        allowed = ALLOWED[package]
        if allowed is None:
            continue
        for imported in sorted(_imported_packages(path) - {package}):
            if imported not in allowed:
                violations.append(f"{path.relative_to(PACKAGE)} imports qlorakit.{imported}")
    assert not violations, "imports against docs/design.md's direction:\n" + "\n".join(violations)


def test_nothing_outside_cli_imports_cli():
    outside = [p for p in PACKAGE.rglob("*.py") if _package_of(p) not in ("cli", "__main__")]
    users = [p for p in outside if "cli" in _imported_packages(p)]
    assert not users, f"modules importing qlorakit.cli: {users}"


def test_only_cli_imports_serve():
    outside = [p for p in PACKAGE.rglob("*.py") if _package_of(p) not in ("cli", "serve")]
    users = [p for p in outside if "serve" in _imported_packages(p)]
    assert not users, f"modules importing qlorakit.serve (only cli may): {users}"
