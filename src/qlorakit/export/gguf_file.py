"""Writing a GGUF file tensor by tensor, atomically.

``gguf.GGUFWriter`` is driven in its streaming order: every tensor's name, shape, type and byte size is
declared first (``add_tensor_info``), then the header, the metadata and the tensor table are written, then
each tensor's bytes in the declared order (``write_tensor_data``). A ``PlannedTensor`` therefore carries a
``produce`` function that computes its bytes only when it is written, so at most one converted tensor is
alive at a time. The file is written to ``.<name>.tmp-<random>`` in the target's directory, flushed and
``fsync``-ed, renamed over the target and the directory ``fsync``-ed: a crash leaves the old file or none,
never a half-written one. An existing target is refused unless ``overwrite``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlorakit.errors import ConfigError
from qlorakit.export.gguf_types import encoded_nbytes
from qlorakit.fileio import fsync_path


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: GGUF name, torch-order shape, ggml type, and how to compute its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return encoded_nbytes(self.shape, self.qtype)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` without ``overwrite``, and a directory always (cheap: before any loading)."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; pass a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")


def _declare(writer: Any, tensor: PlannedTensor) -> None:
    import gguf

    types = gguf.GGMLQuantizationType
    dtype = np.float16 if tensor.qtype == types.F16 else np.float32
    raw = None if tensor.qtype in (types.F32, types.F16) else tensor.qtype
    writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype), tensor.nbytes, raw_dtype=raw)


def write_gguf(
    path: Path,
    arch: str,
    write_metadata: Callable[[Any], None],
    tensors: Sequence[PlannedTensor],
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a GGUF of architecture ``arch`` with ``write_metadata(writer)``'s keys and ``tensors`` to ``path``."""
    import gguf
    from tqdm.auto import tqdm

    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        write_metadata(writer)
        for tensor in tensors:
            _declare(writer, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress) as bar:
            for tensor in tensors:
                data = tensor.produce()
                if data.nbytes != tensor.nbytes:
                    raise ConfigError(f"{tensor.name}: produced {data.nbytes} bytes, declared {tensor.nbytes}")
                writer.write_tensor_data(data)
                bar.update(tensor.nbytes)
                del data
        fout = writer.fout[0]
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
