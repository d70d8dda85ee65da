"""Memory planner vs measurement on CPU: predicted peak RSS of ``qlorakit plan`` next to the measured one.

    python benchmarks/plan_accuracy.py [--steps 3 --seq 256 --batch 1 --r 16 --repeats 3 --threads 1]

Run it from a snapshot of a commit when others edit the checkout, so every process imports the same code:
``git archive HEAD | tar -x -C /tmp/snap && cd /tmp/snap && QLORAKIT_GIT_HEAD=$(git -C <repo> rev-parse HEAD)
PYTHONPATH=$PWD/src python benchmarks/plan_accuracy.py --output <repo>/benchmarks/results/plan_accuracy.json``.

Cases: SmolLM2-135M (the shared GGUF) and two random-weight Llama shapes written once to a temporary
directory as bf16 safetensors + config.json (``llama-350m``: d 1024, 24 layers, ffn 2816; ``llama-700m``:
d 1536, 24 layers, ffn 4096; vocab 32000, untied head). Each measurement is a fresh interpreter (cases
alternate, ``--repeats`` rounds) that loads the model with ``load_model`` (NF4 + double quant, block 64,
fp32 compute, LoRA on all linears, dropout 0.05), then runs ``--steps`` optimizer steps of
``qlorakit.train.train`` (paged AdamW, gradient checkpointing, the chunked loss, batch ``--batch`` x 1
accumulation, a checkpoint at the end) on fixed-length random token sequences of ``--seq`` tokens. Its
``ru_maxrss`` is the measured peak (the driver imports no torch and writes the random models in a child, so a
child inherits no peak). The prediction is ``qlorakit.planner.plan`` for the same model and settings on
``device="cpu"``. Reports the median measured peak, the prediction, and prediction / measurement; the
target is within +-15%. The planner's measured CPU constants come from shapes that are not benchmark
cases (``--measure-framework``: a 2-layer width-64 Llama; ``--measure-heap``: ``llama-heap``, width 512,
8 layers), except ``heap_retention``, fitted on ``llama-350m``'s ``dynamic_threshold`` run (see
``qlorakit.planner.constants``).

Two conditions per case (``--conditions`` picks): ``default`` (the trainer's ``malloc_mmap_threshold_kib``,
1 MiB, fixed in the child before torch is imported and the model loads, as ``qlorakit train`` does; no
planner term is fitted to it: every case validates) and ``dynamic_threshold`` (``malloc_mmap_threshold_kib=0``:
glibc keeps freed heap memory; the planner adds ``heap_retention``, fitted on ``llama-350m`` only, in the run
of commit ebfdedf kept in ``benchmarks/results/plan_accuracy_ebfdedf.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlorakit.config import MemoryConfig

from _harness import git_head, median_of, run_child

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = REPO / "benchmarks/results/plan_accuracy.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-plan-accuracy"
SEED = 42
#: Measurement conditions: name -> ``MemoryConfig.malloc_mmap_threshold_kib`` of the measured run (the
#: default is the trainer's own; ``qlorakit.config`` imports no torch, so the driver stays torch-free).
CONDITIONS = {"default": MemoryConfig().malloc_mmap_threshold_kib, "dynamic_threshold": 0}
#: name -> LlamaConfig fields of the random-weight shapes.
RANDOM_SHAPES = {
    "llama-350m": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 2816,
                   "num_attention_heads": 16, "num_key_value_heads": 16},
    "llama-700m": {"hidden_size": 1536, "num_hidden_layers": 24, "intermediate_size": 4096,
                   "num_attention_heads": 16, "num_key_value_heads": 16},
}  # fmt: skip
#: The shape whose load measures ``CPU_FRAMEWORK_BYTES`` (``--measure-framework``).
TINY_SHAPE = {"llama-tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                             "num_attention_heads": 4, "num_key_value_heads": 4}}
#: The shape whose first training step measures ``CPU_SMALL_BLOCK_HEAP_ROWS`` (``--measure-heap``): width 512,
#: so at 256 tokens a ``(T, d)`` fp32 row block is 512 KiB, under the trainer's 1 MiB mmap threshold.
HEAP_SHAPE = {"llama-heap": {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1408,
                             "num_attention_heads": 8, "num_key_value_heads": 8}}


def write_random_llama(name: str, workdir: Path) -> Path:
    """A random-weight Llama of shape ``RANDOM_SHAPES[name]`` as bf16 safetensors + config.json (written once)."""
    out = workdir / name
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
                                      **{**RANDOM_SHAPES, **TINY_SHAPE, **HEAP_SHAPE}[name])  # fmt: skip
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    for key, shape in shapes.items():  # norms 1, everything else N(0, 0.02)
        value = torch.ones(shape) if "norm" in key else torch.randn(shape, generator=gen) * 0.02
        tensors[key] = value.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# --- child: one measured training run ------------------------------------------------------------------


def run_case(args: argparse.Namespace, on_loaded: Any = None) -> dict[str, Any]:
    """Load ``args.model`` in 4 bits with LoRA, train ``args.steps`` steps; peak RSS and where it was reached."""
    from functools import partial

    from qlorakit.train.allocator import fix_mmap_threshold

    fix_mmap_threshold(args.mmap_threshold_kib)  # before torch and the model, as ``qlorakit train`` does
    import torch

    from qlorakit.config import DataConfig, LoraConfig, MemoryConfig, OptimConfig, QuantConfig, RunConfig, TrainConfig
    from qlorakit.data import collate
    from qlorakit.hardware import current_rss_mb, peak_rss_mb
    from qlorakit.models import load_model
    from qlorakit.train import train

    torch.set_num_threads(args.threads)
    baseline = current_rss_mb()
    torch.manual_seed(SEED)
    lora = LoraConfig(r=args.r)
    model = load_model(args.model, quant=QuantConfig(), lora=lora, compute_dtype=torch.float32)
    after_load = peak_rss_mb()
    rss_after_load = current_rss_mb()
    reset_hwm = _reset_peak()
    if on_loaded is not None:
        on_loaded()
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(SEED)
    n = args.batch * args.steps
    examples = [{"input_ids": torch.randint(0, vocab, (args.seq,), generator=gen).tolist()} for _ in range(n)]
    # packing off: the planner's prediction is for batch x seq as given (packing would merge or cut the sequences)
    cfg = RunConfig(model=args.model, lora=lora, data=DataConfig(packing=False), train=TrainConfig(
        max_steps=args.steps, batch_size=args.batch, grad_accum=1, compute_dtype="float32", seed=SEED),
        optim=OptimConfig(optim=args.optim, warmup_ratio=0.0),
        memory=MemoryConfig(gradient_checkpointing=True, malloc_mmap_threshold_kib=args.mmap_threshold_kib))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, examples, [], partial(collate, pad_id=0), cfg, Path(run_dir), progress=False)
    return {"baseline_rss_mib": baseline, "peak_after_load_mib": after_load, "rss_after_load_mib": rss_after_load,
            "train_hwm_mib": _hwm_mib() if reset_hwm else None, "peak_rss_mib": peak_rss_mb(),
            "train_s": time.perf_counter() - start}


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure_framework(args: argparse.Namespace) -> dict[str, Any]:
    """RSS after loading a 2-layer width-64 random Llama, minus its tensors: ``CPU_FRAMEWORK_BYTES``."""
    import torch

    from qlorakit.config import QuantConfig
    from qlorakit.hardware import current_rss_mb
    from qlorakit.models import load_model

    model = load_model(args.model, quant=QuantConfig(), compute_dtype=torch.float32)
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    tensors += sum(t.numel() * t.element_size() for m in model.modules() if hasattr(m, "qweight")
                   for t in m.qweight.tensors())  # fmt: skip
    rss = current_rss_mb()
    return {"rss_after_load_mib": rss, "tensors_mib": tensors / 2**20, "framework_mib": rss - tensors / 2**20}


def measure_heap(args: argparse.Namespace) -> dict[str, Any]:
    """glibc heap growth over the first training steps, in ``(B, T, d)`` row blocks per layer.

    The result is the planner's ``CPU_SMALL_BLOCK_HEAP_ROWS``.

    ``mallinfo2().arena`` (the main heap, which glibc does not shrink here: the freed blocks stay resident)
    after ``train`` minus before it, over ``layers * batch * seq * d * 4`` bytes.
    """
    import ctypes

    from qlorakit.train.allocator import fix_mmap_threshold

    fix_mmap_threshold(args.mmap_threshold_kib)
    import transformers

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = {}
    config = transformers.AutoConfig.from_pretrained(args.model)
    row_bytes = args.batch * args.seq * config.hidden_size * 4
    result = run_case(args, on_loaded=lambda: before.update(arena=libc.mallinfo2().arena))
    grown = libc.mallinfo2().arena - before["arena"]
    return {**result, "heap_growth_mib": grown / 2**20, "row_block_kib": row_bytes / 1024,
            "rows_per_layer": grown / (config.num_hidden_layers * row_bytes)}


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's CPU prediction for ``args.model`` with the benchmark's settings."""
    from qlorakit.planner import PlanSettings, model_shape, plan

    settings = PlanSettings(seq_len=args.seq, batch_size=args.batch, lora_r=args.r, optim=args.optim,
                            device="cpu", gradient_checkpointing=True, mmap_threshold_kib=args.mmap_threshold_kib)
    shape = model_shape(args.model)
    result = plan(shape, settings)
    quantized = sum(lin.numel for lin in shape.linears if lin.quantized)
    return {"parts_mib": {p.name: p.nbytes / 2**20 for p in result.parts}, "total_mib": result.total_bytes / 2**20,
            "quantized_params": quantized, "total_params": shape.total_params}


def _child(
    mode: str, model: str, args: argparse.Namespace, threshold_kib: int = CONDITIONS["default"]
) -> dict[str, Any]:
    """Run this script in a fresh interpreter in ``mode`` and return its RESULT line."""
    flags = [f"--{mode}", "--model", model, "--steps", str(args.steps), "--seq", str(args.seq), "--batch",
             str(args.batch), "--r", str(args.r), "--optim", args.optim, "--threads", str(args.threads),
             "--mmap-threshold-kib", str(threshold_kib)]  # fmt: skip
    env = {"OMP_NUM_THREADS": str(args.threads), "TORCH_COMPILE_DISABLE": "1"}
    return run_child(__file__, flags, env=env, prefix="RESULT ")


def cases(workdir: Path, gguf: Path) -> dict[str, str]:
    out = {"smollm2-135m": str(gguf)}
    out.update({name: str(_write_in_child(name, workdir)) for name in RANDOM_SHAPES})
    return out


def _write_in_child(name: str, workdir: Path) -> Path:
    """``write_random_llama`` in a fresh interpreter: a child forked by a driver that held the weights would
    start with the driver's resident set as its ``ru_maxrss`` (Linux keeps it across fork and exec)."""
    cmd = [sys.executable, __file__, "--write-model", name, "--workdir", str(workdir)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return workdir / name


def summarize(name: str, condition: str, runs: list[dict[str, Any]], prediction: dict[str, Any]) -> dict[str, Any]:
    """The median measured peak of one case and condition next to the planner's prediction."""
    measured = median_of(runs, "peak_rss_mib")
    retention = prediction["parts_mib"].get("heap_retention", 0.0)
    implied = (measured - (prediction["total_mib"] - retention)) * 2**20 / prediction["quantized_params"]
    return {"case": name, "condition": condition, "mmap_threshold_kib": CONDITIONS[condition],
            "measured_peak_mib": measured, "measured_peak_min_mib": min(r["peak_rss_mib"] for r in runs),
            "measured_peak_max_mib": max(r["peak_rss_mib"] for r in runs),
            "predicted_peak_mib": prediction["total_mib"],
            "ratio_predicted_over_measured": prediction["total_mib"] / measured,
            "within_15pct": abs(prediction["total_mib"] / measured - 1) <= 0.15,
            "measured_peak_after_load_mib": median_of(runs, "peak_after_load_mib"),
            "implied_heap_retention_per_qparam": implied, "prediction": prediction, "runs": runs}  # fmt: skip


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<14}{'condition':<19}{'params':>13}{'measured MiB':>14}{'(min-max)':>13}{'predicted':>11}"
          f"{'pred/meas':>11}  within 15%")
    for row in rows:
        spread = f"{row['measured_peak_min_mib']:,.0f}-{row['measured_peak_max_mib']:,.0f}"
        print(f"{row['case']:<14}{row['condition']:<19}{row['prediction']['total_params']:>13,}"
              f"{row['measured_peak_mib']:>14,.0f}{spread:>13}{row['predicted_peak_mib']:>11,.0f}"
              f"{row['ratio_predicted_over_measured']:>11.3f}  {row['within_15pct']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--optim", default="paged_adamw")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--gguf", type=Path, default=GGUF, help="the SmolLM2 GGUF (default: ../shared/models/...)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS),
                        help="measurement conditions to run (default: all)")
    parser.add_argument("--predict-only", action="store_true",
                        help="reuse the measured runs in --output and recompute only the predictions")
    parser.add_argument("--measure-framework", action="store_true", help="print CPU_FRAMEWORK_BYTES' measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--predict", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure-heap", action="store_true", help="print CPU_SMALL_BLOCK_HEAP_ROWS' measurement")
    parser.add_argument("--heap-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--write-model", help=argparse.SUPPRESS)
    parser.add_argument("--mmap-threshold-kib", type=int, default=CONDITIONS["default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, fn in (("child", run_case), ("predict", predict), ("framework_child", measure_framework),
                     ("heap_child", measure_heap)):
        if getattr(args, flag):
            print("RESULT " + json.dumps(fn(args)))
            return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.write_model:
        write_random_llama(args.write_model, args.workdir)
        return
    if args.measure_framework:
        tiny = _write_in_child("llama-tiny", args.workdir)
        print(json.dumps(_child("framework-child", str(tiny), args), indent=2))
        return
    if args.measure_heap:
        heap_model = _write_in_child("llama-heap", args.workdir)
        print(json.dumps(_child("heap-child", str(heap_model), args), indent=2))
        return
    run_driver(args)


def run_driver(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    paths = cases(args.workdir, args.gguf)
    conditions = {c: CONDITIONS[c] for c in args.conditions}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {c: [] for c in conditions} for name in paths}
    measured: dict[str, Any] = {}  # where the runs were measured, when only the predictions are recomputed
    if args.predict_only:
        old = json.loads(args.output.read_text())
        measured = old.get("measured") or {k: old[k] for k in ("command", "date", "git_head", "total_seconds")}
        for row in old["results"]:
            if row["condition"] in conditions:
                runs[row["case"]][row["condition"]] = row["runs"]
    else:
        for _ in range(args.repeats):  # cases and conditions alternate within each round
            for name, path in paths.items():
                for condition, kib in conditions.items():
                    runs[name][condition].append(_child("child", path, args, kib))
                    peak = runs[name][condition][-1]["peak_rss_mib"]
                    print(f"{name} ({condition}): peak {peak:,.0f} MiB", flush=True)
    rows = [summarize(name, condition, runs[name][condition], _child("predict", path, args, kib))
            for name, path in paths.items() for condition, kib in conditions.items()]  # fmt: skip
    print_table(rows)
    from qlorakit.fileio import write_json_atomic

    write_json_atomic(args.output, {
        "benchmark": "plan_accuracy", "description": __doc__.strip().splitlines()[0],
        "command": "python benchmarks/plan_accuracy.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_head": os.environ.get("QLORAKIT_GIT_HEAD") or git_head(),
        "settings": {k: getattr(args, k) for k in ("steps", "seq", "batch", "r", "optim", "repeats", "threads")},
        "calibrated_on": "llama-350m", "conditions": conditions, "total_seconds": time.perf_counter() - started,
        **({"measured": measured} if measured else {}), "results": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
