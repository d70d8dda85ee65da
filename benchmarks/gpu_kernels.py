"""qlorakit's Triton 4-bit kernels vs bitsandbytes' CUDA kernels on one GPU (a script; needs CUDA).

    python benchmarks/gpu_kernels.py [--shapes 4096x4096,11008x4096,4096x11008 --tokens 2048 --dtype bfloat16
                                      --repeats 5 --iters 20 --peak-gbs GBS --peak-tflops TF --output PATH]

Each weight ``W`` (``N`` outputs x ``K`` inputs, random normal) is quantized once by bitsandbytes on the GPU
(NF4, double quant, block 64) and qlorakit reads the very same state (``QuantizedTensor.from_bnb_dict``).
Four operations, ours vs the peer, in the same process:

- dequantize to ``--dtype``: ``triton_ops.dequantize_4bit`` vs ``bitsandbytes.functional.dequantize_4bit``.
  GB/s = bytes moved / time, bytes = ``n/2`` codes + ``n/64`` 8-bit scales + ``4 n/(64*256)`` nested scales
  + ``n`` output values; also as % of the datasheet HBM peak and of a device copy measured in this run.
- forward ``y = x W^T``, ``x``: (``--tokens``, K): the fused ``triton_ops.matmul_4bit`` (``W`` decoded in
  registers) vs ``bitsandbytes.matmul_4bit`` (its training path: dequantize, then ``torch.matmul``).
- input gradient ``dx = dy W``: ``triton_ops.grad_input_4bit`` vs bitsandbytes' backward (dequantize, then
  ``torch.matmul``). TFLOP/s = ``2 tokens N K`` / time; also as % of the datasheet bf16 peak and of a
  plain bf16 8192^3 matmul measured in this run.
- GEMV, one token: ``triton_ops.gemv_4bit`` vs ``bitsandbytes.matmul_4bit`` on one row without grad (its
  ``gemv_4bit`` kernel); GB/s of the 4-bit weight and its scales read.

Timing: CUDA events around ``--iters`` calls after one untimed call (the first call also runs Triton's
autotuner), the two contenders in turn, ``--repeats`` times; medians. ratio = ours / peer time (below 1:
ours faster). peak MiB = what one call allocates beyond its inputs. max rel diff = ``max|ours - peer| /
max|peer|`` of the outputs (both decode the same codes; the sums differ in order). Without CUDA it
measures nothing: it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path
from typing import Any

from _harness import write_result
from gpu_common import (
    alternate,
    copy_bandwidth_gbs,
    datasheet_peak,
    environment,
    matmul_tflops,
    median,
    no_cuda_message,
    peak_extra_mib,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks/results/gpu_kernels.json"
BLOCKSIZE, NESTED = 64, 256
DTYPES = ("bfloat16", "float16", "float32")
#: Where the tensors live; tests run the measuring code on "cpu" under the Triton interpreter.
DEVICE = "cuda"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` -> ``[(4096, 4096), (11008, 4096)]`` (N outputs x K inputs, K even)."""
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r}: write it as NxK with positive integers, e.g. 4096x11008")
        n, k = int(parts[0]), int(parts[1])
        if k % 2:
            raise ValueError(f"shape {item!r}: K must be even (one packed byte holds two inputs of a row)")
        shapes.append((n, k))
    return shapes


def dequant_bytes(n: int, out_bytes: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes a dequantization of ``n`` values moves: codes, 8-bit scales, nested fp32 scales, the output."""
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED) + n * out_bytes


def gemv_bytes(n_out: int, k_in: int, act_bytes: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes a batch-1 GEMV must read and write: the 4-bit weight with its scales, ``x`` and ``y``."""
    return dequant_bytes(n_out * k_in, 0, blocksize) + (k_in + n_out) * act_bytes


def summarize(op: str, shape: tuple[int, int], times: dict[str, list[float]], peaks: dict[str, float],
              work: float, unit: str, max_rel_diff: float) -> dict[str, Any]:  # fmt: skip
    """One result row: per contender median ms, rate (``work`` per second in ``unit``), peak MiB; the ratio."""
    scale = 1e9 if unit == "GB/s" else 1e12
    row: dict[str, Any] = {"op": op, "shape": list(shape), "unit": unit, "work": work, "max_rel_diff": max_rel_diff}
    for name in ("ours", "peer"):
        ms = median(times[name])
        row[name] = {"ms_median": ms, "ms_repeats": times[name], "rate": work / (ms * 1e-3) / scale,
                     "peak_mib": peaks[name]}  # fmt: skip
    row["ratio_ours_over_peer"] = row["ours"]["ms_median"] / row["peer"]["ms_median"]
    return row


def add_fractions(row: dict[str, Any], peaks: dict[str, float | None]) -> None:
    """``ours_pct_datasheet`` / ``ours_pct_measured`` (and the peer's) of the row's unit."""
    key = "gbs" if row["unit"] == "GB/s" else "tflops"
    for name in ("ours", "peer"):
        for kind in ("datasheet", "measured"):
            peak = peaks.get(f"{kind}_{key}")
            row[name][f"pct_{kind}"] = None if not peak else 100 * row[name]["rate"] / peak


def format_table(rows: list[dict[str, Any]], peaks: dict[str, float | None]) -> str:
    """The one table: a line per (op, shape), ours and the peer side by side."""
    head = (f"{'op':<11}{'N x K':>13}{'ours ms':>10}{'peer ms':>10}{'ours/peer':>10}{'unit':>8}{'ours':>9}"
            f"{'peer':>9}{'ours %sheet':>12}{'ours %meas':>11}{'ours MiB':>10}{'peer MiB':>10}"
            f"{'rel diff':>10}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = [r["ours"].get(f"pct_{k}") for k in ("datasheet", "measured")]
        pct_cells = "".join(f"{'-' if p is None else format(p, '.1f'):>{w}}"
                            for p, w in zip(pct, (12, 11), strict=True))
        lines.append(
            f"{r['op']:<11}{'x'.join(map(str, r['shape'])):>13}{r['ours']['ms_median']:>10.3f}"
            f"{r['peer']['ms_median']:>10.3f}{r['ratio_ours_over_peer']:>10.2f}{r['unit']:>8}{r['ours']['rate']:>9.1f}"
            f"{r['peer']['rate']:>9.1f}{pct_cells}{r['ours']['peak_mib']:>10.1f}{r['peer']['peak_mib']:>10.1f}"
            f"{r['max_rel_diff']:>10.1e}"
        )
    lines.append(f"peaks: datasheet {peaks.get('datasheet_gbs')} GB/s, {peaks.get('datasheet_tflops')} TFLOP/s bf16; "
                 f"measured copy {peaks.get('measured_gbs', 0):.0f} GB/s, bf16 matmul "
                 f"{peaks.get('measured_tflops', 0):.0f} TFLOP/s")  # fmt: skip
    return "\n".join(lines)


# --- GPU side -----------------------------------------------------------------------------------------


def _contenders(shape: tuple[int, int], args: argparse.Namespace) -> list[tuple[str, dict, float, str]]:
    """(op, {"ours": fn, "peer": fn}, work, unit) for the four operations on one weight shape."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
    import torch

    from qlorakit.quant.backends import triton_ops
    from qlorakit.quant.tensor import QuantizedTensor

    dtype = getattr(torch, args.dtype)
    n_out, k_in = shape
    w = torch.randn(n_out, k_in, device=DEVICE, dtype=dtype)
    packed, state = bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    del w
    q = QuantizedTensor.from_bnb_dict(packed, state.as_dict(packed=True), f"W{n_out}x{k_in}")
    x = torch.randn(args.tokens, k_in, device=DEVICE, dtype=dtype)
    dy = torch.randn(args.tokens, n_out, device=DEVICE, dtype=dtype)
    x1 = torch.randn(1, 1, k_in, device=DEVICE, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    flops = 2.0 * args.tokens * n_out * k_in
    return [
        ("dequantize", {"ours": lambda: triton_ops.dequantize_4bit(q, dtype),
                        "peer": lambda: bnb_f.dequantize_4bit(packed, state)},
         dequant_bytes(n_out * k_in, size), "GB/s"),
        ("forward", {"ours": lambda: triton_ops.matmul_4bit(x, q),
                     "peer": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)}, flops, "TFLOP/s"),
        ("grad_input", {"ours": lambda: triton_ops.grad_input_4bit(dy, q),
                        "peer": lambda: dy @ bnb_f.dequantize_4bit(packed, state).to(dtype)}, flops, "TFLOP/s"),
        ("gemv", {"ours": lambda: triton_ops.gemv_4bit(x1, q),
                  "peer": lambda: bnb.matmul_4bit(x1, packed.t(), quant_state=state)},
         gemv_bytes(n_out, k_in, size), "GB/s"),
    ]  # fmt: skip


def _measure(shape: tuple[int, int], args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    rows = []
    with torch.no_grad():
        for op, fns, work, unit in _contenders(shape, args):
            ours, peer = fns["ours"]().float(), fns["peer"]().float()
            diff = ((ours - peer).abs().max() / peer.abs().max().clamp_min(1e-30)).item()
            del ours, peer
            peaks = {name: peak_extra_mib(fn) for name, fn in fns.items()}
            times = alternate(fns, args.repeats, args.iters)
            rows.append(summarize(op, shape, times, peaks, work, unit, diff))
            r = rows[-1]
            print(f"  {op:<10} {shape[0]}x{shape[1]}: ours {r['ours']['ms_median']:.3f} ms, peer "
                  f"{r['peer']['ms_median']:.3f} ms", flush=True)  # fmt: skip
    return rows


def _peaks(args: argparse.Namespace) -> dict[str, float | None]:
    import torch

    sheet_gbs, sheet_tflops = datasheet_peak(torch.cuda.get_device_name(0))
    return {"datasheet_gbs": args.peak_gbs or sheet_gbs, "datasheet_tflops": args.peak_tflops or sheet_tflops,
            "measured_gbs": copy_bandwidth_gbs(), "measured_tflops": matmul_tflops()}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="weights as NxK, comma-separated")
    p.add_argument("--tokens", type=int, default=2048, help="rows of x for the forward / input-gradient matmuls")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute / output dtype")
    p.add_argument("--repeats", type=int, default=5, help="measurements per contender, alternating (median)")
    p.add_argument("--iters", type=int, default=20, help="calls per measurement")
    p.add_argument("--peak-gbs", type=float, default=None, help="HBM GB/s to use instead of the datasheet table")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 TFLOP/s to use instead of the datasheet")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    try:
        args.shape_list = parse_shapes(args.shapes)
    except ValueError as exc:
        p.error(str(exc))
    if args.repeats < 3 or args.iters < 1 or args.tokens < 2:
        p.error("need --repeats >= 3 (a median), --iters >= 1 and --tokens >= 2 (one token is the GEMV row)")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = no_cuda_message("gpu_kernels.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    started = time.perf_counter()
    peaks = _peaks(args)
    rows = [row for shape in args.shape_list for row in _measure(shape, args)]
    for row in rows:
        add_fractions(row, peaks)
    print(format_table(rows, peaks))
    write_result(args.output, {
        "benchmark": "gpu_kernels", "description": __doc__.split("\n", 1)[0], "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/gpu_kernels.py", *args.argv]), "environment": environment(),
        "config": {"shapes": args.shape_list, "tokens": args.tokens, "dtype": args.dtype, "repeats": args.repeats,
                   "iters": args.iters, "format": f"nf4, double quant, block {BLOCKSIZE}"},
        "peaks": peaks, "rows": rows, "total_seconds": time.perf_counter() - started,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
