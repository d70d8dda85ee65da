"""Static resources of qlorakit's Triton kernels per autotune configuration, from the compiler alone (a script).

    python benchmarks/gpu_kernel_resources.py [--archs 80,90 --output PATH]

No GPU is needed and nothing is run or timed. Each kernel is compiled with ``triton.compile`` for
``sm_<arch>`` (the bf16 variant, NF4 + double quant, block 64, ``K`` a multiple of the block) in every
configuration the autotuner may pick. The PTX is then assembled by the ``ptxas`` that Triton itself uses
for that architecture, with ``-v``. The script reports registers per thread, spill stores/loads in bytes
(local-memory traffic in the inner loop, usually slow), and the shared memory Triton allocates (a config
above the device's limit fails to launch, and the autotuner skips it). It also reports the matmul's
per-element scale path (``K`` not a multiple of the block). These are compile-time facts, not speeds.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks/results/gpu_kernel_resources.json"

WEIGHT = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
          "nested_code_ptr": "*fp32", "offset": "fp32"}  # fmt: skip
FORMAT = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": True}
MATMUL_INTS = ("M", "P", "R", "K", "stride_am", "stride_ar", "stride_om", "stride_op", "M_BUCKET")


def signature(kernel: str, dtype: str) -> dict[str, str]:
    """Triton's type string of every runtime argument of ``kernel`` for activations/outputs of ``dtype``."""
    if kernel == "dequantize":
        return WEIGHT | {"out_ptr": f"*{dtype}", "n_elements": "i32"}
    if kernel == "gemv":
        return {"x_ptr": f"*{dtype}"} | WEIGHT | {"out_ptr": f"*{dtype}", "N": "i32", "K": "i32"}
    return {"a_ptr": f"*{dtype}"} | WEIGHT | {"out_ptr": f"*{dtype}"} | dict.fromkeys(MATMUL_INTS, "i32")


def variants() -> list[tuple[str, str, dict[str, Any], list]]:
    """(label, kernel, constexprs, [(meta, num_warps, num_stages)]) for every kernel variant and config."""
    from qlorakit.quant.backends import triton_ops

    def configs(name: str) -> list:
        return [(c.kwargs, c.num_warps, c.num_stages) for c in triton_ops._gpu_configs(name)]

    matmul = FORMAT | {"PRECISION": "tf32"}
    dequant_rows = max(1, triton_ops.DEQUANT_BYTES // (FORMAT["BLOCKSIZE"] // 2))
    return [
        ("dequantize", "dequantize", FORMAT, [({"ROWS": dequant_rows}, 4, 3)]),
        ("gemv", "gemv", FORMAT | {"K_ALIGNED": True}, configs("gemv")),
        ("matmul forward", "matmul", matmul | {"FORWARD": True, "K_ALIGNED": True}, configs("matmul")),
        ("matmul grad_input", "matmul", matmul | {"FORWARD": False, "K_ALIGNED": True}, configs("matmul")),
        ("matmul per-element", "matmul", matmul | {"FORWARD": True, "K_ALIGNED": False}, configs("matmul")),
    ]


def compile_kernel(kernel: str, dtype: str, constexprs: dict[str, Any], arch: int, warps: int = 4,
                   stages: int = 3) -> Any:  # fmt: skip
    """``triton.compile`` of one kernel variant for ``sm_<arch>`` (fp contraction off, as every launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qlorakit.quant.backends import triton_kernels

    fn = getattr(triton_kernels, f"{kernel}_kernel")
    if type(fn).__name__ == "InterpretedFunction":
        raise SystemExit("TRITON_INTERPRET=1 is set: the interpreter's kernels cannot be compiled; unset it")
    sig = signature(kernel, dtype) | dict.fromkeys(constexprs, "constexpr")
    options = {"enable_fp_fusion": False, "num_warps": warps, "num_stages": stages}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)  # fmt: skip


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes that Triton's own ``ptxas`` reports for ``ptx`` on ``sm_<arch>``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(path), "-o",
               str(Path(tmp) / "kernel.cubin")]  # fmt: skip
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    numbers = {"registers": r"Used (\d+) registers", "spill_store_bytes": r"(\d+) bytes spill stores",
               "spill_load_bytes": r"(\d+) bytes spill loads"}  # fmt: skip
    return {key: int(re.search(pattern, text).group(1)) for key, pattern in numbers.items()}


def measure(archs: list[int]) -> list[dict[str, Any]]:
    rows = []
    for arch in archs:
        for label, kernel, constexprs, configs in variants():
            for meta, warps, stages in configs:
                compiled = compile_kernel(kernel, "bf16", constexprs | meta, arch, warps, stages)
                row = {"arch": f"sm_{arch}", "variant": label, "config": meta, "num_warps": warps,
                       "num_stages": stages, "shared_bytes": compiled.metadata.shared}  # fmt: skip
                rows.append(row | ptxas_report(compiled.asm["ptx"], arch))
                print(f"  {row['arch']} {label} {meta}", flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'arch':<7}{'variant':<20}{'config':<44}{'warps':>6}{'stages':>7}{'regs':>6}"
            f"{'spill st/ld B':>15}{'shared B':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        config = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r["config"].items())
        spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        lines.append(f"{r['arch']:<7}{r['variant']:<20}{config:<44}{r['num_warps']:>6}{r['num_stages']:>7}"
                     f"{r['registers']:>6}{spill:>15}{r['shared_bytes']:>10}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--archs", default="80,90", help="CUDA compute capabilities, e.g. 80,90")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    from _harness import write_result

    archs = [int(a) for a in args.archs.split(",")]
    rows = measure(archs)
    print(format_table(rows))
    from gpu_common import environment

    write_result(args.output, {
        "benchmark": "gpu_kernel_resources", "description": __doc__.split("\n", 1)[0],
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/gpu_kernel_resources.py", *(argv or sys.argv[1:])]),
        "environment": environment(), "format": "bf16 activations, nf4 + double quant, block 64", "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
