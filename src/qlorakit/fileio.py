"""Writing result files so that a crash never leaves one half-written (imports nothing heavy).

Each writer puts the content into ``<name>.tmp`` next to the target and renames it over the target
(``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via ``<path>.tmp``; parent directories are created."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def save_figure_atomic(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure to ``path`` via ``<stem>.tmp<suffix>`` (the format follows the suffix)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    os.replace(tmp, out)
    return out


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` via ``<path>.tmp``."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
