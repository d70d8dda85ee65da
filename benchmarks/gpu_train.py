"""QLoRA training of a Llama-7B-shaped model on one GPU: qlorakit vs transformers + peft + bitsandbytes (a script).

    python benchmarks/gpu_train.py [--seq-len 2048 --steps 8 --warmup 3 --repeats 3 --fit-gib 24
                                    --fit-lengths 2048,3072,4096,6144,8192 --workdir DIR --output PATH]

The model: Llama-2-7B's shape (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000, untied head) with
random N(0, 0.02) bf16 weights (norms 1), written once to ``--workdir`` as sharded safetensors + config.json;
both stacks load that directory. Both: NF4 + double quant (block 64) on every decoder linear, bf16 compute,
LoRA r 64 / alpha 16 / dropout 0.05 (fp32 adapters) on q,k,v,o,gate,up,down, gradient checkpointing
(non-reentrant), AdamW lr 2e-4 (fp32 state on the GPU, not paged: paged state lives in managed memory that
torch's allocator statistics do not count), grad-norm clip 0.3, batch 1 of ``--seq-len`` random tokens
(seeded, the same in both), loss on every token:

- ours: ``qlorakit.models.load_model(dir, QuantConfig(), LoraConfig(...), device="cuda", compute_dtype=bf16)``,
  qlorakit's AdamW, qlorakit's training loss (``train.loss.token_loss_sum``, chunked head);
- theirs: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(nf4, double quant,
  bf16 compute))``, ``peft.prepare_model_for_kbit_training`` + ``get_peft_model``, ``torch.optim.AdamW``,
  the model's own loss (``labels=``).

Each measurement is a fresh process (ours, theirs, ours, ...). Timed: whole optimizer steps (synchronized)
after ``--warmup`` untimed ones; tokens/s = tokens / seconds; peak = ``torch.cuda.max_memory_allocated``
over the run (weights included). MFU = tokens/s * 8 N / peak bf16 FLOP/s, N = decoder linears + head + LoRA
(the embedding lookup is not a matmul): 2N forward, 2N input gradients, 2N recompute, 2N nominal for the
weight gradients the frozen base does not have; attention scores are ignored (the convention of
``train_throughput.py``), against the datasheet peak and a plain bf16 matmul measured in the same run.
Longest sequence in ``--fit-gib``: torch's allocator capped with ``set_per_process_memory_fraction``, one
full step per length of ``--fit-lengths`` in increasing order until the first out-of-memory error (the
CUDA context is outside the cap; qlorakit's first step at a new length also runs Triton's autotuner,
whose benchmark allocates a 256 MiB scratch buffer inside the cap).
Without CUDA it measures nothing: it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import medians, run_child, write_result
from gpu_common import datasheet_peak, environment, matmul_tflops, no_cuda_message

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks/results/gpu_train.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-gpu-train"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPHA, DROPOUT, LR, CLIP, SEED = 16.0, 0.05, 2e-4, 0.3, 42
SHAPE_FILE = "benchmark_shape.json"
#: Where the children train; tests run one speed child on "cpu" with a tiny model.
DEVICE = "cuda"


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder; the defaults are Llama-2-7B's."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32000
    max_positions: int = 16384

    def tensors(self, layer: int | None) -> dict[str, tuple[int, ...]]:
        """Name -> shape of one decoder layer's tensors, or (``layer=None``) of the embedding, final norm, head."""
        if layer is None:
            return {"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,),
                    "lm_head.weight": (self.vocab, self.hidden)}  # fmt: skip
        kv = self.hidden // self.heads * self.kv_heads
        p = f"model.layers.{layer}."
        return {
            p + "self_attn.q_proj.weight": (self.hidden, self.hidden), p + "self_attn.k_proj.weight": (kv, self.hidden),
            p + "self_attn.v_proj.weight": (kv, self.hidden), p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
            p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
            p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
            p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
            p + "input_layernorm.weight": (self.hidden,), p + "post_attention_layernorm.weight": (self.hidden,),
        }  # fmt: skip

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul: every decoder linear and the head (not the embedding)."""
        per_layer = sum(_numel(s) for name, s in self.tensors(0).items() if len(s) == 2)
        return self.layers * per_layer + self.vocab * self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA parameters of rank ``rank`` on every decoder linear: ``r (in + out)`` each."""
        return self.layers * sum(rank * (s[0] + s[1]) for s in self.tensors(0).values() if len(s) == 2)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def write_model(out: Path, shape: LlamaShape, seed: int = SEED) -> Path:
    """Random bf16 Llama weights as sharded safetensors (one shard per layer) + config.json, written once.

    Written to ``<out>.partial`` and renamed, so an interrupted write never looks finished; a directory whose
    ``benchmark_shape.json`` matches ``shape`` is reused as it is.
    """
    import torch
    import transformers
    from safetensors.torch import save_file
    from tqdm import tqdm

    if (out / SHAPE_FILE).is_file() and json.loads((out / SHAPE_FILE).read_text()) == asdict(shape):
        return out
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(tmp)  # fmt: skip
    groups = [None, *range(shape.layers)]
    weight_map, total = {}, 0
    for index, layer in enumerate(tqdm(groups, desc="write random weights", unit="shard")):
        gen = torch.Generator().manual_seed(seed + index)
        tensors = {name: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
                   for name, s in shape.tensors(layer).items()}  # fmt: skip
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
        total += sum(t.numel() * 2 for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (tmp / SHAPE_FILE).write_text(json.dumps(asdict(shape)))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --- children (one stack per process) -----------------------------------------------------------------


def _ours(model_dir: str, rank: int) -> tuple[Any, list, Any]:
    import torch

    from qlorakit.config import LoraConfig, QuantConfig
    from qlorakit.models import load_model
    from qlorakit.optim import make_optimizer
    from qlorakit.train.loss import token_loss_sum

    lora = LoraConfig(r=rank, alpha=ALPHA, dropout=DROPOUT, targets=TARGETS)
    model = load_model(model_dir, quant=QuantConfig(), lora=lora, device=DEVICE, compute_dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def loss_fn(batch):
        loss_sum, count = token_loss_sum(model, batch)
        return loss_sum / max(count, 1)

    return loss_fn, params, optimizer


def _theirs(model_dir: str, rank: int) -> tuple[Any, list, Any]:
    import peft
    import torch
    import transformers

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": DEVICE})
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS),
                             bias="none", task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, config)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return lambda batch: model(**batch).loss, params, optimizer


def _batch(seq_len: int, vocab: int, step: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(SEED + step)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(DEVICE)  # (1, seq)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _step(loss_fn, params, optimizer, batch) -> float:
    import torch

    loss = loss_fn(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _cuda_stat(name: str) -> float:
    """``torch.cuda.<name>()`` in MiB after a synchronize (0 when the children run on CPU in tests)."""
    import torch

    if DEVICE != "cuda":
        return 0.0
    torch.cuda.synchronize()
    return getattr(torch.cuda, name)() / 2**20


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Load one stack, train ``--steps`` steps; per-step seconds, losses, peak memory."""
    started = time.perf_counter()
    loss_fn, params, optimizer = (_ours if args.worker == "ours" else _theirs)(args.model_dir, args.rank)
    after_load = _cuda_stat("memory_allocated")
    load_s = time.perf_counter() - started
    steps = []
    for step in range(args.steps):
        batch = _batch(args.seq_len, args.vocab, step)
        _cuda_stat("memory_allocated")  # synchronize before the clock starts
        t0 = time.perf_counter()
        loss = _step(loss_fn, params, optimizer, batch)  # float(loss) waits for the step
        _cuda_stat("memory_allocated")
        steps.append({"loss": loss, "seconds": time.perf_counter() - t0, "tokens": args.seq_len})
    timed = steps[args.warmup :]
    return {"load_s": load_s, "allocated_after_load_mib": after_load, "steps": steps,
            "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
            "peak_allocated_mib": _cuda_stat("max_memory_allocated"),
            "peak_reserved_mib": _cuda_stat("max_memory_reserved"),
            "trainable_params": sum(p.numel() for p in params)}  # fmt: skip


def run_fit(args: argparse.Namespace) -> dict[str, Any]:
    """Under a ``--fit-gib`` allocator cap: one step per length, increasing, until out of memory."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.fit_gib * 2**30 / total))
    tried: dict[str, str] = {}
    try:
        loss_fn, params, optimizer = (_ours if args.worker == "ours" else _theirs)(args.model_dir, args.rank)
    except torch.OutOfMemoryError:
        return {"tried": {"load": "out of memory"}, "longest_fitting": None}
    longest = None
    for length in args.fit_length_list:
        try:
            _step(loss_fn, params, optimizer, _batch(length, args.vocab, 0))
        except torch.OutOfMemoryError:
            tried[str(length)] = "out of memory"
            break
        tried[str(length)] = f"ok, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        longest = length
    return {"tried": tried, "longest_fitting": longest}


def run_peak(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {"matmul_tflops": matmul_tflops(), "device": torch.cuda.get_device_name(0)}


# --- driver -------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """Run this script in a fresh interpreter with ``extra`` flags; its last stdout line is JSON."""
    return run_child(__file__, [*args.argv, *extra], show_stderr=True)


def summarize(runs: dict[str, list[dict]], fits: dict[str, dict], shape: LlamaShape, rank: int,
              peaks: dict[str, float | None]) -> dict[str, Any]:  # fmt: skip
    """Medians per stack, ours/theirs ratios, MFU against both peaks, the longest fitting sequence."""
    flops_per_token = 8 * (shape.matmul_params() + shape.lora_params(rank))
    keys = ("tokens_per_s", "peak_allocated_mib", "peak_reserved_mib", "load_s")
    median = medians(runs, keys)
    for m in median.values():
        for kind in ("datasheet", "measured"):
            peak = peaks.get(f"{kind}_tflops")
            m[f"mfu_{kind}"] = None if not peak else m["tokens_per_s"] * flops_per_token / (peak * 1e12)
    ratio = {key: median["ours"][key] / median["theirs"][key] for key in keys}
    return {"median": median, "ratio_ours_over_theirs": ratio, "flops_per_token": flops_per_token,
            "longest_fitting": {k: f["longest_fitting"] for k, f in fits.items()}, "fit_runs": fits,
            "final_loss": {k: rs[0]["steps"][-1]["loss"] for k, rs in runs.items()}}  # fmt: skip


def format_table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """The one table: medians per stack, then ours / theirs."""
    cols = (("tok/s", "tokens_per_s", ".1f"), ("peak alloc MiB", "peak_allocated_mib", ".0f"),
            ("peak resv MiB", "peak_reserved_mib", ".0f"), ("MFU sheet", "mfu_datasheet", ".1%"),
            ("MFU meas", "mfu_measured", ".1%"), ("load s", "load_s", ".1f"))  # fmt: skip
    head = f"{'stack':<24}" + "".join(f"{t:>16}" for t, _, _ in cols) + f"{f'fits {args.fit_gib:g} GiB':>16}"
    lines = [head, "-" * len(head)]
    for kind, name in (("ours", "qlorakit"), ("theirs", "transformers+peft+bnb")):
        med = summary["median"][kind]
        cells = "".join(f"{'-' if med.get(key) is None else format(med[key], fmt):>16}" for _, key, fmt in cols)
        lines.append(f"{name:<24}{cells}{summary['longest_fitting'][kind]!s:>16}")
    ratio = summary["ratio_ours_over_theirs"]
    lines.append(f"{'ours / theirs':<24}" + "".join(f"{ratio[key]:>16.2f}" if key in ratio else f"{'':>16}"
                                                   for _, key, _ in cols))  # fmt: skip
    lines.append(f"median of {args.repeats} runs each; seq {args.seq_len}, batch 1, {args.steps} steps, first "
                 f"{args.warmup} untimed; LoRA r {args.rank}; fit ladder {args.fit_lengths}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for field, default in asdict(LlamaShape()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=default, help=f"model {field}")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per step (batch 1)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="runs per stack, alternating ours/theirs (median)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha 16)")
    p.add_argument("--fit-gib", type=float, default=24.0, help="allocator cap of the longest-sequence search")
    p.add_argument("--fit-lengths", default="2048,3072,4096,6144,8192", help="sequence lengths to try, increasing")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 TFLOP/s instead of the datasheet table")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the random model is written")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("speed", "fit", "peak"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.fit_length_list = [int(x) for x in args.fit_lengths.split(",")]
    except ValueError:
        p.error(f"--fit-lengths {args.fit_lengths!r}: write comma-separated integers, e.g. 2048,4096")
    if args.fit_length_list != sorted(args.fit_length_list) or max(args.fit_length_list) > args.max_positions:
        p.error("--fit-lengths must increase and stay within --max-positions")
    if args.warmup >= args.steps or args.repeats < 1 or args.seq_len > args.max_positions:
        p.error("need --warmup < --steps, --repeats >= 1 and --seq-len <= --max-positions")
    return args


def shape_of(args: argparse.Namespace) -> LlamaShape:
    return LlamaShape(**{field: getattr(args, field) for field in asdict(LlamaShape())})


def _run_all(args: argparse.Namespace, model_dir: Path) -> tuple[dict, dict, list]:
    base = ("--model-dir", str(model_dir))
    peaks = [_child(args, "--mode", "peak", *base)]
    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    for repeat in range(args.repeats):
        for kind in ("ours", "theirs"):
            run = _child(args, "--worker", kind, "--mode", "speed", *base)
            runs[kind].append(run)
            print(f"  {repeat + 1}/{args.repeats} {kind:<6}: {run['tokens_per_s']:.1f} tok/s, peak "
                  f"{run['peak_allocated_mib']:.0f} MiB, loss {run['steps'][-1]['loss']:.3f}", flush=True)  # fmt: skip
    fits = {kind: _child(args, "--worker", kind, "--mode", "fit", *base) for kind in ("ours", "theirs")}
    peaks.append(_child(args, "--mode", "peak", *base))
    return runs, fits, peaks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode:
        child = {"speed": run_speed, "fit": run_fit, "peak": run_peak}[args.mode]
        print(json.dumps(child(args)))
        return 0
    problem = no_cuda_message("gpu_train.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    started, shape = time.perf_counter(), shape_of(args)
    model_dir = write_model(args.workdir / f"llama-{shape.layers}x{shape.hidden}-random", shape)
    runs, fits, measured = _run_all(args, model_dir)
    device = measured[0]["device"]
    peaks = {"datasheet_tflops": args.peak_tflops or datasheet_peak(device)[1],
             "measured_tflops": max(m["matmul_tflops"] for m in measured)}  # fmt: skip
    summary = summarize(runs, fits, shape, args.rank, peaks)
    print(format_table(summary, args))
    write_result(args.output, {
        "benchmark": "gpu_train", "description": __doc__.split("\n", 1)[0], "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/gpu_train.py", *args.argv]), "environment": environment(),
        "config": {"shape": asdict(shape), "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                   "repeats": args.repeats, "lora_r_alpha_dropout": [args.rank, ALPHA, DROPOUT], "targets": TARGETS,
                   "adamw_lr_clip": [LR, CLIP], "fit_gib": args.fit_gib, "fit_lengths": args.fit_length_list},
        "peaks": peaks, "matmul_tflops_runs": measured, **summary, "runs": runs,
        "mfu_formula": "tokens/s * 8 * (decoder linears + head + LoRA params) / peak bf16 FLOP/s",
        "total_seconds": time.perf_counter() - started,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
