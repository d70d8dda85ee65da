"""``export_gguf``: a model with its LoRA adapter folded in, written as one GGUF file for llama.cpp / Ollama.

Every linear weight is ``W + scale * B @ A`` in fp32 (``models.export.merged_weight``: ``W`` dequantized from
4-bit when the base was loaded so), put in llama.cpp's row order (``gguf_arch.permute_rows``) and converted
once to its GGUF type (``gguf_types.tensor_type``); every other tensor (embedding, norms, an untied head)
is converted from the model's own value. Tensors are computed one at a time as they are written
(``gguf_file.write_gguf``): peak memory is the loaded model plus one merged fp32 tensor and its encoding.

Metadata: a GGUF source's own keys (``gguf_meta``; tensors of the source that the model has no parameter
for, such as ``rope_freqs.weight``, are copied byte for byte); a Hugging Face source's hyper-parameters
from its config and its tokenizer from ``tokenizer.json``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qlorakit.export.gguf_arch import TensorNames, permute_rows, tied_head, write_hyperparameters
from qlorakit.export.gguf_file import PlannedTensor, write_gguf
from qlorakit.export.gguf_meta import copy_metadata, read_source_metadata, write_hf_tokenizer
from qlorakit.export.gguf_types import encode, file_type, tensor_type
from qlorakit.export.notes import low_bit_note
from qlorakit.lora import linear_names
from qlorakit.models.export import _adds_adapter, merged_weight
from qlorakit.models.gguf_reader import GgufHeader, read_gguf_header, read_tensor_bytes
from qlorakit.models.source import GGUF, ModelSource


@dataclass
class GgufExportReport:
    """What ``export_gguf`` wrote."""

    path: Path
    out_type: str
    merged_layers: int = 0
    tensor_types: Counter = field(default_factory=Counter)
    nbytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        lines = [f"wrote {self.path} ({self.nbytes / 2**20:.1f} MiB, {self.out_type}: {types}) "
                 f"in {self.seconds:.1f} s; merged {self.merged_layers} adapted layers"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _linear_tensors(
    model: nn.Module, names: TensorNames, out_type: str, report: GgufExportReport
) -> list[PlannedTensor]:
    """Merged linear weights (+ biases), skipping a head tied to the embedding."""
    tied = tied_head(model)
    planned = []
    for path in linear_names(model):
        module = model.get_submodule(path)
        if module is tied:
            continue
        gguf_name = names.gguf_name(f"{path}.weight")
        shape = (module.out_features, module.in_features)
        qtype, heads = tensor_type(gguf_name, shape, out_type), names.row_heads(gguf_name)
        report.merged_layers += _adds_adapter(module)

        def produce(module=module, qtype=qtype, heads=heads) -> np.ndarray:
            return encode(permute_rows(merged_weight(module).numpy(), heads), qtype)  # (out, in) fp32 -> encoded

        planned.append(PlannedTensor(gguf_name, shape, qtype, produce))
        if module.bias is not None:
            planned.append(_plain(names, f"{path}.bias", module.bias, out_type))
    return planned


def _plain(names: TensorNames, hf_name: str, tensor: Any, out_type: str) -> PlannedTensor:
    gguf_name = names.gguf_name(hf_name)
    shape = tuple(tensor.shape)
    qtype, heads = tensor_type(gguf_name, shape, out_type), names.row_heads(gguf_name)

    def produce() -> np.ndarray:
        return encode(permute_rows(tensor.detach().float().numpy(), heads), qtype)

    return PlannedTensor(gguf_name, shape, qtype, produce)


def model_tensors(model: nn.Module, names: TensorNames, out_type: str, report: GgufExportReport) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in model order, each computed only when written."""
    planned = _linear_tensors(model, names, out_type, report)
    linear_prefixes = tuple(f"{p}." for p in linear_names(model))
    for hf_name, tensor in model.named_parameters():
        if not hf_name.startswith(linear_prefixes):
            planned.append(_plain(names, hf_name, tensor, out_type))
    return planned


def _source_only_tensors(header: GgufHeader, written: set[str]) -> list[PlannedTensor]:
    """Tensors of a GGUF source that the model has no parameter for (e.g. ``rope_freqs.weight``), copied raw."""
    import gguf

    planned = []
    for info in header.tensors:
        if info.name in written:
            continue

        def produce(info=info) -> np.ndarray:
            with open(header.path, "rb") as f:
                return read_tensor_bytes(f, header, info)

        planned.append(PlannedTensor(info.name, info.shape, gguf.GGMLQuantizationType(info.ggml_type), produce))
    return planned


def _hf_metadata(model: nn.Module, source: ModelSource):
    def write(writer: Any) -> None:
        writer.add_type("model")
        writer.add_name(source.path.name)
        write_hyperparameters(writer, model.config)
        write_hf_tokenizer(writer, source.directory, model.config.vocab_size)

    return write


def export_gguf(
    model: nn.Module,
    source: ModelSource,
    output: str | Path,
    out_type: str = "f16",
    overwrite: bool = False,
    progress: bool = True,
) -> GgufExportReport:
    """Write ``model`` (its active adapter merged) as a GGUF of ``out_type`` to ``output``; see the module doc.

    ``source`` is the resolved source the model was loaded from: the metadata and tokenizer come from it.
    """
    import gguf

    start = time.perf_counter()
    report = GgufExportReport(path=Path(output), out_type=out_type)
    names = TensorNames(model.config)
    tensors = model_tensors(model, names, out_type, report)
    if source.kind == GGUF:
        header = read_gguf_header(source.path)
        tensors += _source_only_tensors(header, {t.name for t in tensors})
        write_source = partial(copy_metadata, metadata=read_source_metadata(source.path))
    else:
        write_source = _hf_metadata(model, source)

    def write_metadata(writer: Any) -> None:
        write_source(writer)
        writer.add_file_type(file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    write_gguf(report.path, names.arch.gguf_name, write_metadata, tensors, overwrite=overwrite, progress=progress)
    report.tensor_types = Counter(t.qtype.name for t in tensors)
    report.nbytes = report.path.stat().st_size
    report.seconds = time.perf_counter() - start
    note = low_bit_note(source, report.nbytes, out_type)
    if note:
        report.notes.append(note)
    return report
