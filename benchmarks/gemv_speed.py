"""Batch-1 4-bit matrix-vector products per layer shape: reference, torch lookup, compiled kernel, bitsandbytes.

    python benchmarks/gemv_speed.py [--repeats 200 --threads 1 --rows 1,16,32,64]

For SmolLM2-135M's decoder shapes (out x in: 576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down),
an NF4 + double-quant (block 64) weight, fp32 input of ``rows`` rows:

- ``reference``: ``x @ dequantize_4bit(W).T`` (what ``Linear4bit`` does for many rows);
- ``torch``: ``gemv_4bit(x, W, use_native=False)``, the pure-torch lookup fallback;
- ``native``: ``gemv_4bit(x, W)`` with the compiled AVX-512 kernel (``quant.backends.native_cpu()``, C in
  ``quant/csrc``);
- ``bitsandbytes``: ``bnb.nn.Linear4bit`` (NF4, DQ, compute fp32) in eval mode; on CPUs with AVX512-BF16 it
  repacks the weight on its first call and runs its own C++ kernel (bf16 arithmetic);
- ``dense``: ``x @ W.T`` with the fp32 weight (the memory-bound floor a 4-bit kernel can beat).

Each is timed in rounds that alternate the methods; the table gives the median microseconds per call and
the max |difference| to the fp64 product. No time is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qlorakit.quant import dequantize_4bit, quantize_4bit
from qlorakit.quant.backends import native_cpu
from qlorakit.quant.gemv import gemv_4bit, gemv_4bit_reference

from _harness import write_result

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
OUTPUT = Path(__file__).resolve().parent / "results/gemv_speed.json"


def _bnb_layer(weight: torch.Tensor):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to("cpu").eval()  # .to() quantizes the weight


def measure(shape: tuple[int, int], rows: int, repeats: int) -> dict:
    weight = torch.randn(shape) * 0.05
    q = quantize_4bit(weight, "nf4", 64, True)
    x = torch.randn(rows, shape[1])
    methods = {
        "reference": lambda: gemv_4bit_reference(x, q),
        "torch": lambda: gemv_4bit(x, q, use_native=False),
        "native": lambda: gemv_4bit(x, q),
        "bitsandbytes": _bnb_layer(weight),
        "dense": lambda: x @ weight.t(),
    }
    exact = x.double() @ dequantize_4bit(q, torch.float32).double().t()
    times: dict[str, list[float]] = {name: [] for name in methods}
    errors = {}
    with torch.inference_mode():
        for name, fn in methods.items():
            out = fn(x) if name == "bitsandbytes" else fn()  # warm-up (bitsandbytes repacks here)
            errors[name] = float((out.double() - exact).abs().max()) if name != "dense" else None
        for _ in range(repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                fn(x) if name == "bitsandbytes" else fn()
                times[name].append(time.perf_counter() - start)
    return {"shape": list(shape), "rows": rows, "median_us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
            "max_abs_error_vs_fp64": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,16,32,64")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiled = "yes" if native_cpu() is not None else "NO (torch fallback only)"
    print(f"compiled kernel: {compiled}; threads {args.threads}")
    results = [measure(shape, int(rows), args.repeats) for rows in args.rows.split(",") for shape in SHAPES]
    names = list(results[0]["median_us"])
    print(f"{'shape':>10} {'rows':>4} " + " ".join(f"{n:>12}" for n in names) + "  native/bnb  native/reference")
    for r in results:
        us = r["median_us"]
        print(f"{r['shape'][0]:>4}x{r['shape'][1]:<5} {r['rows']:>4} " + " ".join(f"{us[n]:>12.1f}" for n in names)
              + f"  {us['native'] / us['bitsandbytes']:>10.2f}  {us['native'] / us['reference']:>16.2f}")
    write_result(args.output, {"threads": args.threads, "repeats": args.repeats, "unit": "microseconds per call",
                               "results": results})


if __name__ == "__main__":
    main()
