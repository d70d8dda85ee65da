"""Quantization-error and throughput report of the 4-bit formats (``qlorakit quant-report``).

Error (QLoRA section 3 / Table 2 compare data types this way). For a source of tensors ``x`` with ``n``
elements in all and ``x_hat = dequantize_4bit(quantize_4bit(x))`` in fp32, summed over every tensor
of the source (so a multi-tensor source such as a GGUF model is weighted by element count):

    mean_abs_error = sum |x_hat - x| / n
    rms_error      = sqrt(sum (x_hat - x)^2 / n)
    rel_rms_error  = rms_error / sqrt(sum x^2 / n)      (scale-free: compares sources of any scale)
    bits_per_param = 4 + 32/B               without double quant,
                     4 + 8/B + 32/(256 B)   with it (B = blocksize = 64: 4.5 and 4.127)

Differences and squares are taken in fp32 (relative rounding <= 2^-24) and summed in float64.
Synthetic sources, seed 0: N(0,1), and Student-t with 3 degrees of freedom ``t = z / sqrt(chi2_3 / 3)``
(z ~ N(0,1), chi2_3 a sum of 3 squared N(0,1)) **scaled to unit standard deviation** by
``sqrt((df - 2) / df) = sqrt(1/3)``: heavy tails at the same variance as N(0,1).

Throughput: NF4 with double quant, blocksize 64, on an fp32 tensor ``(numel // 4096, 4096)`` (the last
dimension a multiple of the blocksize: bitsandbytes 0.50.2's AVX512 CPU dequantize is wrong for 2-D
tensors whose rows are not). GB/s = bytes / median seconds of ``repeats`` runs after one warm-up, where
bytes are the fp32 INPUT of quantize and the OUTPUT (fp32 or bf16) of dequantize. bitsandbytes, when
installed, runs in the same process on the same tensor; ``ratio = ours / bitsandbytes``.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlorakit.errors import ConfigError, ModelLoadError
from qlorakit.fileio import write_json_atomic
from qlorakit.quant.codebooks import QUANT_TYPES
from qlorakit.quant.functional import bits_per_param, dequantize_4bit, quantize_4bit

BLOCKSIZE = 64
SEED = 0
STUDENT_T_DF = 3
#: Width of the 2-D throughput tensor; a multiple of every allowed blocksize up to 4096.
THROUGHPUT_COLS = 4096
#: (quant_type, double_quant) rows of the error table, in table order.
CONFIGS: tuple[tuple[str, bool], ...] = tuple((qt, dq) for qt in QUANT_TYPES for dq in (True, False))
#: GGUF tensor-name endings of the decoder's linear weights (q, k, v, o, gate, up, down).
GGUF_LINEAR_SUFFIXES = (
    "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
SOURCE_NOTES = {
    "normal": "N(0,1), seed 0",
    "student_t3": "Student-t df=3 scaled to unit std (t * sqrt(1/3)), seed 0",
}


# --- data ------------------------------------------------------------------------------------------


def normal_data(numel: int, seed: int = SEED) -> torch.Tensor:
    """(numel,) fp32 samples of N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen)


def student_t_data(numel: int, df: int = STUDENT_T_DF, seed: int = SEED) -> torch.Tensor:
    """(numel,) fp32 Student-t samples with integer ``df`` > 2, scaled to unit standard deviation."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(numel, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(df, numel, generator=gen, dtype=torch.float64).square().sum(0)
    t = z / torch.sqrt(chi2 / df)
    return (t * math.sqrt((df - 2) / df)).float()


def gguf_linear_weights(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, fp32 (out, in) tensor) for every decoder linear weight of a GGUF file, in file order.

    GGUF lists dims innermost first, so a tensor is reshaped to its shape reversed.
    """
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError("--gguf needs the gguf package; install it with `pip install gguf`") from exc
    if not Path(path).is_file():
        raise ModelLoadError(f"GGUF file not found: {path}; pass the path of a .gguf model file")
    reader = gguf.GGUFReader(os.fspath(path))
    for tensor in reader.tensors:
        if len(tensor.shape) != 2 or not tensor.name.endswith(GGUF_LINEAR_SUFFIXES):
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        yield tensor.name, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


# --- error -----------------------------------------------------------------------------------------


@dataclass
class ErrorSums:
    """Running float64 sums of the reconstruction error over the tensors of one source."""

    numel: int = 0
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    ref_sq_sum: float = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        diff = (x_hat.float() - x.float()).reshape(-1)  # fp32 rounding here: <= 2^-24 relative
        self.numel += diff.numel()
        self.abs_sum += float(diff.abs().sum(dtype=torch.float64))
        self.sq_sum += float(diff.square().sum(dtype=torch.float64))
        self.ref_sq_sum += float(x.float().square().sum(dtype=torch.float64))

    def as_dict(self) -> dict[str, float | int]:
        rms = math.sqrt(self.sq_sum / self.numel)
        return {
            "numel": self.numel,
            "mean_abs_error": self.abs_sum / self.numel,
            "rms_error": rms,
            "rel_rms_error": rms / math.sqrt(self.ref_sq_sum / self.numel),
        }


def error_rows(source: str, tensors: Iterable[torch.Tensor], blocksize: int = BLOCKSIZE) -> list[dict[str, Any]]:
    """One row per (quant_type, double_quant) with the element-weighted error over ``tensors``."""
    sums = {config: ErrorSums() for config in CONFIGS}
    for x in tensors:
        x = x.float()
        for quant_type, double_quant in CONFIGS:
            x_hat = dequantize_4bit(quantize_4bit(x, quant_type, blocksize, double_quant), torch.float32)
            sums[(quant_type, double_quant)].add(x, x_hat)
    if sums[CONFIGS[0]].numel == 0:
        raise ConfigError(f"error source {source!r} has no tensors; check the model file holds linear weights")
    return [
        {
            "source": source,
            "quant_type": quant_type,
            "double_quant": double_quant,
            "blocksize": blocksize,
            "bits_per_param": bits_per_param(quant_type, blocksize, double_quant),
            **sums[(quant_type, double_quant)].as_dict(),
        }
        for quant_type, double_quant in CONFIGS
    ]


def error_ordering(rows: list[dict[str, Any]], source: str, double_quant: bool, key: str = "rms_error") -> str:
    """The quant types of one source sorted by ``key``, e.g. ``"nf4 < fp4 < int4"``."""
    chosen = [r for r in rows if r["source"] == source and r["double_quant"] == double_quant]
    return " < ".join(r["quant_type"] for r in sorted(chosen, key=lambda r: r[key]))


# --- throughput ------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput_shape(numel: int) -> tuple[int, int]:
    """(rows, 4096) with rows * 4096 <= numel (at least one row)."""
    return max(1, numel // THROUGHPUT_COLS), THROUGHPUT_COLS


def _ours_ops(x: torch.Tensor) -> tuple[dict[str, Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]:
    q = quantize_4bit(x, "nf4", BLOCKSIZE, True)
    ops = {
        "quantize": lambda: quantize_4bit(x, "nf4", BLOCKSIZE, True),
        "dequantize_fp32": lambda: dequantize_4bit(q, torch.float32),
        "dequantize_bf16": lambda: dequantize_4bit(q, torch.bfloat16),
    }
    return ops, ops["dequantize_fp32"]


def _bnb_ops(x: torch.Tensor) -> tuple[dict[str, Callable[[], Any]], Callable[[], torch.Tensor]] | None:
    """bitsandbytes' CPU ops on ``x`` (None when it is not installed)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    packed, state = bnbf.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    state_bf16 = copy.copy(state)
    state_bf16.dtype = torch.bfloat16  # same codes and scales, bf16 output
    ops = {
        "quantize": lambda: bnbf.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"),
        "dequantize_fp32": lambda: bnbf.dequantize_4bit(packed, state),
        "dequantize_bf16": lambda: bnbf.dequantize_4bit(packed, state_bf16),
    }
    return ops, ops["dequantize_fp32"]


def _bytes_moved(op: str, numel: int) -> int:
    return numel * (2 if op == "dequantize_bf16" else 4)


def throughput(numel: int, repeats: int, seed: int = SEED) -> dict[str, Any]:
    """Quantize / dequantize GB/s of ours and of bitsandbytes (if installed) on the same tensor."""
    rows_, cols = throughput_shape(numel)
    x = normal_data(rows_ * cols, seed).view(rows_, cols)  # (rows, 4096) fp32
    ours, ours_out = _ours_ops(x)
    bnb = _bnb_ops(x)
    rows = []
    for op, fn in ours.items():
        nbytes = _bytes_moved(op, x.numel())
        row = {"op": op, "bytes": nbytes, "ours_gbps": nbytes / median_seconds(fn, repeats) / 1e9}
        if bnb is not None:
            row["bnb_gbps"] = nbytes / median_seconds(bnb[0][op], repeats) / 1e9
            row["ratio_ours_over_bnb"] = row["ours_gbps"] / row["bnb_gbps"]
        rows.append(row)
    return {
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": BLOCKSIZE,
        "shape": [rows_, cols],
        "repeats": repeats,
        "bytes_basis": "quantize: fp32 input bytes; dequantize: output bytes (fp32 or bf16)",
        "bitsandbytes": _bnb_version() if bnb is not None else "bitsandbytes not installed",
        "dequantize_identical_to_bnb": None if bnb is None else bool(torch.equal(ours_out(), bnb[1]())),
        "rows": rows,
    }


# --- environment -----------------------------------------------------------------------------------


def _bnb_version() -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.__version__


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model and the speed-relevant flags (None where /proc/cpuinfo cannot be read)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {"model_name": platform.processor() or None, **{flag: None for flag in CPU_FLAGS}}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name"), **{flag: flag in flags for flag in CPU_FLAGS}}


def environment() -> dict[str, Any]:
    """Versions, threads and CPU flags that the timings depend on."""
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "bitsandbytes": _bnb_version(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu": cpu_info(),
    }


# --- the report ------------------------------------------------------------------------------------


def check_args(numel: int, repeats: int) -> None:
    if numel < THROUGHPUT_COLS:
        raise ConfigError(f"--numel {numel} is too small; use at least {THROUGHPUT_COLS} (one 4096-wide row)")
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats} must be at least 1")


def _weights_noting_names(pairs: Iterable[tuple[str, torch.Tensor]], names: list[str]) -> Iterator[torch.Tensor]:
    for name, weight in pairs:
        names.append(name)
        yield weight


def build_report(numel: int, repeats: int, gguf_path: str | None = None, seed: int = SEED) -> dict[str, Any]:
    """Everything ``quant-report`` prints and writes, as one JSON-ready dict."""
    check_args(numel, repeats)
    sources = dict(SOURCE_NOTES)
    errors = error_rows("normal", [normal_data(numel, seed)])
    errors += error_rows("student_t3", [student_t_data(numel, seed=seed)])
    if gguf_path is not None:
        names: list[str] = []
        errors += error_rows("gguf", _weights_noting_names(gguf_linear_weights(gguf_path), names))
        sources["gguf"] = f"{len(names)} decoder linear weights of {gguf_path}, element-weighted"
    return {
        "report": "qlorakit quant-report",
        "environment": environment(),
        "settings": {"numel": numel, "repeats": repeats, "blocksize": BLOCKSIZE, "seed": seed},
        "sources": sources,
        "errors": errors,
        "throughput": throughput(numel, repeats, seed),
    }


def format_errors(rows: list[dict[str, Any]]) -> str:
    """Plain-text error table, one line per source x quant type x double quant."""
    head = f"{'source':<12}{'type':<6}{'dq':<5}{'bits/param':>11}{'mean|err|':>12}{'rms err':>12}{'rel rms':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['source']:<12}{r['quant_type']:<6}{'on' if r['double_quant'] else 'off':<5}"
            f"{r['bits_per_param']:>11.3f}{r['mean_abs_error']:>12.5f}{r['rms_error']:>12.5f}"
            f"{r['rel_rms_error']:>10.4f}"
        )
    return "\n".join(lines)


def format_throughput(tp: dict[str, Any]) -> str:
    """Plain-text throughput table with the byte basis and the bitsandbytes status."""
    lines = [
        (f"throughput: {tp['quant_type']} + double quant, blocksize {tp['blocksize']}, fp32 tensor "
        f"{tp['shape'][0]}x{tp['shape'][1]}, median of {tp['repeats']} after a warm-up"),
        f"GB/s basis: {tp['bytes_basis']}; bitsandbytes: {tp['bitsandbytes']}",
        f"{'op':<18}{'ours GB/s':>11}{'bnb GB/s':>11}{'ours/bnb':>10}",
    ]
    for r in tp["rows"]:
        bnb = f"{r['bnb_gbps']:>11.3f}{r['ratio_ours_over_bnb']:>10.2f}" if "bnb_gbps" in r else f"{'-':>11}{'-':>10}"
        lines.append(f"{r['op']:<18}{r['ours_gbps']:>11.3f}{bnb}")
    if tp["dequantize_identical_to_bnb"] is not None:
        lines.append(f"dequantized values identical to bitsandbytes: {tp['dequantize_identical_to_bnb']}")
    return "\n".join(lines)


def format_environment(env: dict[str, Any]) -> str:
    flags = " ".join(f"{f}={'yes' if env['cpu'][f] else 'no'}" for f in CPU_FLAGS)
    load = env["load_average_1min"]
    return (
        f"torch {env['torch']}, {env['torch_threads']} threads, CPU {env['cpu']['model_name']}; {flags}; "
        f"load average {'n/a' if load is None else f'{load:.2f}'} (timings are noisy on a busy machine)"
    )


def format_report(report: dict[str, Any]) -> str:
    notes = "\n".join(f"  {name}: {note}" for name, note in report["sources"].items())
    return "\n\n".join(
        [
            format_environment(report["environment"]),
            "reconstruction error of dequantize(quantize(x)) vs x, blocksize 64; sources:\n" + notes,
            format_errors(report["errors"]),
            format_throughput(report["throughput"]),
        ]
    )


def main_from_args(args: Any) -> int:
    """Entry point of ``qlorakit quant-report``: args has ``output``, ``numel``, ``repeats``, ``gguf``."""
    report = build_report(args.numel, args.repeats, args.gguf)
    print(format_report(report))
    path = write_json_atomic(args.output, report)
    print(f"\nwrote {path}")
    return 0
