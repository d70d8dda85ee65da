"""Build and load the C kernels of ``qlorakit/quant/csrc`` (the compiled half of the ``cpu_native`` backend).

The sources ship as package data and are read with ``importlib.resources`` (so an installed wheel finds
them too). They are compiled once with the system C compiler (``$CC``, else ``cc``, else ``gcc``),

    cc -O3 -march=native -ffp-contract=off -shared -fPIC -o <library> gemv4bit.c dequant4bit.c gemv_dense.c

(``-ffp-contract=off``: the scale decode then rounds as torch does), into
``$XDG_CACHE_HOME/qlorakit/kernels/cpu_kernels-<key>.so``, written atomically, and loaded with ``ctypes``.
``<key>`` is a sha256 of the source texts, the compiler flags and the CPU the code targets (the machine and
its CPU flags: ``-march=native`` code only runs where the CPU has the same instruction sets), so an edited
source, a new flag or another CPU builds a new library and a stale one is never loaded.

Each exported function is declared once, by name, in a ``Prototype`` table (``cpu_native.PROTOTYPES``);
``load_library`` checks that table against the C definitions (names, argument names, argument and return
types) before it builds anything, then sets every function's ``argtypes``/``restype`` from it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qlorakit.hardware import cpu_flags

#: The package and folder holding the C sources (package data), and the files compiled into one library.
SOURCE_PACKAGE, SOURCE_FOLDER = "qlorakit.quant", "csrc"
SOURCES = ("common.h", "gemv4bit.c", "dequant4bit.c", "gemv_dense.c")

#: Compiler flags; part of the cache key.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")

#: Set to "0" to keep the CPU on the pure-torch path.
NATIVE_ENV = "QLORAKIT_NATIVE"

#: A pointer argument: the C side takes a typed pointer, Python passes ``tensor.data_ptr()`` or ``None``.
DATA_PTR = ctypes.c_void_p

#: ctypes type of each C scalar type the kernels use (``void`` only as a return type).
_SCALARS = {"void": None, "float": ctypes.c_float, "int64_t": ctypes.c_int64, "int": ctypes.c_int}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
#: A function definition at column 0 that is not ``static``: "<return type> <name>(<parameters>) {".
_DEFINITION = re.compile(r"^(?!static\b)([A-Za-z_][\w \t*]*?)(\w+)\s*\(([^)]*)\)\s*\{", re.MULTILINE)
_DECLARATOR = re.compile(r"^(.*?)(\w+)$", re.DOTALL)


@dataclass(frozen=True)
class Prototype:
    """One exported C function: its name, ``(argument name, ctypes type)`` in order, and its return type."""

    name: str
    args: tuple[tuple[str, Any], ...]
    restype: Any = None


def read_sources() -> dict[str, str]:
    """``{file name: text}`` of the C sources, read from the installed package with ``importlib.resources``."""
    folder = resources.files(SOURCE_PACKAGE) / SOURCE_FOLDER
    return {name: (folder / name).read_text(encoding="utf-8") for name in SOURCES}


def _ctype(c_type: str) -> Any:
    """The ctypes type that passes a C ``c_type`` (``"const float*"``, ``"int64_t"``, ``"void"``)."""
    c_type = " ".join(c_type.split())
    if "*" in c_type:
        return DATA_PTR
    if c_type not in _SCALARS:
        raise RuntimeError(f"C type {c_type!r} has no ctypes mapping; add it to cpu_build._SCALARS")
    return _SCALARS[c_type]


def exported_functions(sources: Mapping[str, str]) -> dict[str, Prototype]:
    """The non-static functions defined in ``sources``, as the ``Prototype`` their C definitions imply."""
    found = {}
    for text in sources.values():
        for head, name, params in _DEFINITION.findall(_COMMENT.sub("", text)):
            args = []
            for param in params.split(","):
                c_type, arg = _DECLARATOR.match(param.strip()).groups()
                args.append((arg, _ctype(c_type)))
            found[name] = Prototype(name, tuple(args), _ctype(head))
    return found


def check_prototypes(prototypes: Sequence[Prototype], sources: Mapping[str, str]) -> None:
    """Raise ``RuntimeError`` unless ``prototypes`` declare exactly the functions the C sources export."""
    found = exported_functions(sources)
    declared = {p.name: p for p in prototypes}
    if set(found) != set(declared):
        raise RuntimeError(f"the C sources export {sorted(found)} but the Prototype table declares "
                           f"{sorted(declared)}; make cpu_native.PROTOTYPES match quant/csrc")
    for name, prototype in declared.items():
        if prototype != found[name]:
            raise RuntimeError(f"Prototype {prototype} does not match the C definition {found[name]}; "
                               "make cpu_native.PROTOTYPES match quant/csrc")


def target_cpu() -> str:
    """The CPU ``-march=native`` code is built for: the machine and its sorted CPU flags (else the host name)."""
    return platform.machine() + " " + (" ".join(sorted(cpu_flags())) or platform.node())


def cache_key(sources: Mapping[str, str], flags: Sequence[str], built_for: str) -> str:
    """16 hex digits of the sha256 of the source texts (with their names), the compiler flags and what the code
    is built for (the CPU for these ``-march=native`` kernels; the torch build for ``train.arena``)."""
    record = json.dumps({"sources": dict(sources), "flags": list(flags), "cpu": built_for}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qlorakit" / "kernels"


def find_compiler() -> str | None:
    """The C compiler to build with: ``$CC`` (default ``cc``) on PATH, else ``gcc``, else ``None``."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def compile_library(sources: Mapping[str, str], target: Path, compiler: str | None = None,
                    flags: Sequence[str] = CFLAGS, libraries: Sequence[str] = ()) -> None:  # fmt: skip
    """Compile ``sources`` into the shared library ``target`` (built beside it, then renamed into place):
    ``<compiler> <flags> -o <target> <the .c/.cpp units> <libraries>``; ``compiler`` defaults to
    ``find_compiler()``. ``train.arena`` builds its C++ through it too."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        units = [str(Path(tmp) / name) for name in sources if name.endswith((".c", ".cpp"))]
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, "-o", str(built), *units, *libraries], check=True, capture_output=True,
                       text=True)  # fmt: skip
        os.replace(built, target)


def load_library(prototypes: Sequence[Prototype]) -> ctypes.CDLL | None:
    """The compiled kernels with ``prototypes`` applied (built on first use), or ``None`` when they are off
    (``QLORAKIT_NATIVE=0``), the machine is not x86-64, or they cannot be built or loaded (a warning says why)."""
    if os.environ.get(NATIVE_ENV, "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        sources = read_sources()
        check_prototypes(prototypes, sources)
        target = cache_dir() / f"cpu_kernels-{cache_key(sources, CFLAGS, target_cpu())}.so"
        if not target.is_file():
            compile_library(sources, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"qlorakit: native CPU kernels unavailable ({detail}); using the pure-torch path", stacklevel=2)
        return None
    for prototype in prototypes:
        function = getattr(library, prototype.name)
        function.argtypes, function.restype = [t for _, t in prototype.args], prototype.restype
    return library
