"""QLoRA training throughput on CPU: ``qlorakit train`` defaults vs transformers + bitsandbytes + peft (a script).

    python benchmarks/train_throughput.py [--steps 10 --warmup 2 --repeats 3 --seq-len 512 --batch-size 2
                                           --dtype float32 --threads 1 --ours-mode cli ...]

Both stacks train LoRA (r 16, alpha 16, dropout ``--lora-dropout`` = 0.05, q/k/v/o/gate/up/down of every block)
on SmolLM2-135M in NF4 + double quant (block 64), the same compute dtype (``--dtype``), lr 2e-4 constant, no
warmup, weight decay 0, grad-norm clip 0.3, loss = summed next-token CE / target tokens:

- ours, the headline (``--ours-mode cli``): ``qlorakit train`` itself (``qlorakit.cli.main.main`` in the
  child) with only model, data, shape (seq, batch, r, alpha), dtype, step and warmup flags: everything else is
  its default, i.e. what its memory-budget planner picks for this machine (checkpointing, allocator, optimizer
  paging, loss chunk; printed and in the run's ``config.yaml``, kept in the result JSON);
- ours with ``--ours-mode library``: ``qlorakit.models.load_model`` + ``qlorakit.train.train`` (``optim="adamw"``)
  with the ``--ours-*`` settings (checkpointing per ``--ours-checkpointing``);
- theirs, the standard stack: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(nf4,
  double quant, compute dtype))``, ``peft.prepare_model_for_kbit_training`` (gradient checkpointing ON,
  non-reentrant) + ``get_peft_model``, ``torch.optim.AdamW`` and a plain loop written like qlorakit's
  ``_one_step`` with the standard full-logits loss (``qlorakit.train.loss.reference_loss_sum``).

With dropout > 0 the two stacks draw different masks (qlorakit one per shared-input group, peft one per
layer, from different RNG streams), so their loss curves agree only statistically: the result reports the
per-step |diff| and the spread between repeats of one stack, which is zero (both are seeded).

Same inputs: the GGUF (``--model``) is converted once by transformers to fp32 safetensors that BOTH stacks
load; the data is tokenized once (``build_datasets``, ``max_seq_len = --seq-len``) and the micro-batch
order fixed once (``MicroBatchStream``, group-by-length, seed 42); qlorakit's seeded initial ``A`` is copied
into peft's ``lora_A`` (``B`` = 0 in both); same ``torch.set_num_threads``; fp32 denormals flushed in both
loops (qlorakit's trainer does it; the peer's loop calls ``torch.set_flush_denormal(True)``).

Timed: each optimizer step from collating its micro-batches to ``zero_grad`` (forward, backward with
recomputation, clip, AdamW) — qlorakit's own per-step clock (``metrics.jsonl``) and the same span in the
peer's loop — without the first ``--warmup`` steps; tokens/s = non-padding input tokens / seconds. Each
run is a fresh interpreter (ours, theirs, ours, ...): its ``ru_maxrss`` is the peak RSS, its RSS after
imports the baseline (the driver imports no torch: a child inherits a parent's peak RSS). MFU: see
``MFU_FORMULA``; peak = best ``n x n`` matmul GFLOP/s in ``--dtype``, same threads, at start and end.
Reports medians of ``--repeats``, ours/theirs ratios, loss curves' max |diff|.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _harness import cpu_model, extras_present, git_head, medians, run_child, write_result

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = REPO / "benchmarks/results/train_throughput.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-train-throughput"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, LR, CLIP, SEED = 16, 16.0, 2e-4, 0.3, 42
INIT_A = "lora_init_A.safetensors"
#: Attention FLOPs per layer, per (query, key) pair of a causal sequence, per unit of attention width:
#: QK^T and AV are 2 multiply-adds each forward (4), and backward is twice the forward (x3 in all).
ATTN_FLOPS = 12
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


# --- children -----------------------------------------------------------------------------------------


def convert_once(gguf_path: str, workdir: Path) -> Path:
    """The GGUF ``gguf_path`` as a dense fp32 safetensors directory under ``workdir`` (converted on first use)."""
    import torch
    import transformers

    out = workdir / (Path(gguf_path).stem + "-fp32")
    if not (out / "model.safetensors").is_file():
        gguf = Path(gguf_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dense fp32 already (see the model's README)
        del model.config.quantization_config
        tmp = out.with_name(out.name + ".partial")
        model.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Convert the GGUF to fp32 safetensors once; tokenize the data and fix the batch order; count params."""
    import torch
    import transformers

    from qlorakit.config import DataConfig
    from qlorakit.data import build_datasets, default_sample_path, pad_id_of
    from qlorakit.models import load_tokenizer
    from qlorakit.train.loop import MicroBatchStream

    out = convert_once(args.model, args.workdir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = sum(p.numel() for p in model.parameters())  # the tied embedding/head once
    lora = sum(RANK * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)  # fmt: skip
    tokenizer = load_tokenizer(out)
    data_path = args.data or str(default_sample_path())
    data_cfg = DataConfig(paths=(data_path,), max_seq_len=args.seq_len, val_size=0, seed=SEED)
    train_set, _, _ = build_datasets(data_cfg, tokenizer)
    stream = MicroBatchStream(train_set.lengths, args.batch_size, SEED, group_by_length=True)
    order = [stream.at(i)[1] for i in range(args.steps * args.grad_accum)]
    data = {"pad_id": pad_id_of(tokenizer), "examples": list(train_set), "order": order, "data_path": data_path}
    (args.workdir / "data.json").write_text(json.dumps(data))
    if args.ours_mode == "cli":  # `qlorakit train` seeds train.seed (42) right before load_model: the same A here
        from qlorakit.config import LoraConfig, QuantConfig
        from qlorakit.models import load_model

        torch.manual_seed(SEED)
        lora_cfg = LoraConfig(r=RANK, alpha=ALPHA, dropout=args.lora_dropout)
        _share_initial_a(load_model(out, quant=QuantConfig(), lora=lora_cfg, compute_dtype=getattr(torch, args.dtype)),
                         args.workdir)  # fmt: skip
    cfg = model.config
    attn_width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    lengths = [len(x["input_ids"]) for x in data["examples"]]
    ga = args.grad_accum
    attention = [ATTN_FLOPS * cfg.num_hidden_layers * attn_width * sum(
        lengths[i] * (lengths[i] + 1) // 2 for micro in order[s * ga : (s + 1) * ga] for i in micro)
        for s in range(args.steps)]  # fmt: skip
    return {"model_dir": str(out), "data": data_path, "base_params": base, "lora_params": lora,
            "examples": len(train_set), "attention_flops_per_step": attention}  # fmt: skip


def matmul_peak(n: int, threads: int, dtype: str = "float32", tries: int = 10) -> float:
    """Best ``n x n @ n x n`` GFLOP/s in ``dtype`` at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    best, _ = 0.0, a @ b  # the first call warms up
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _share_initial_a(model: Any, workdir: Path) -> bool:
    """Save qlorakit's initial ``A`` (first run) or check this run drew the same; True if identical."""
    import torch
    from safetensors.torch import load_file, save_file

    from qlorakit.lora.model import lora_layers

    init = {p: m.lora_A["default"].weight.detach().clone().contiguous() for p, m in lora_layers(model).items()}
    path = workdir / INIT_A
    if not path.is_file():
        save_file(init, path.with_suffix(".partial"))
        os.replace(path.with_suffix(".partial"), path)
        return True
    saved = load_file(path)
    return saved.keys() == init.keys() and all(torch.equal(saved[k], init[k]) for k in init)


def run_ours(args: argparse.Namespace, data: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """qlorakit: load_model + LoRA, then ``qlorakit.train.train``; per-step times from its metrics.jsonl."""
    from functools import partial

    import torch

    from qlorakit.config import (
        DataConfig,
        LoraConfig,
        MemoryConfig,
        OptimConfig,
        QuantConfig,
        RunConfig,
        TrainConfig,
    )
    from qlorakit.data import collate
    from qlorakit.hardware import current_rss_mb, peak_rss_mb
    from qlorakit.models import load_model
    from qlorakit.train import train

    baseline = current_rss_mb()
    torch.manual_seed(SEED)  # the adapter initialization, as `qlorakit train` seeds it
    lora = LoraConfig(r=RANK, alpha=ALPHA, dropout=args.lora_dropout, targets=TARGETS)
    start = time.perf_counter()
    model = load_model(model_dir, quant=QuantConfig(), lora=lora, compute_dtype=getattr(torch, args.dtype))
    load_s, load_peak = time.perf_counter() - start, peak_rss_mb()
    same_init = _share_initial_a(model, args.workdir)
    tuning = {"loss_chunk_tokens": args.ours_loss_chunk, "malloc_mmap_threshold_kib": args.ours_mmap_kib}
    tuning = {k: v for k, v in tuning.items() if v is not None}
    tuning["gradient_checkpointing"] = args.ours_checkpointing == "on"
    # packing off: the peer trains the same unpacked micro-batches, and the loss curves are compared step by step
    cfg = RunConfig(model=model_dir, lora=lora, data=DataConfig(seed=SEED, group_by_length=True, packing=False),
                    train=TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=SEED,
        compute_dtype=args.dtype, logging_steps=1),
        optim=OptimConfig(lr=LR, scheduler="constant", warmup_ratio=0.0, max_grad_norm=CLIP, optim="adamw"),
        memory=MemoryConfig(**tuning))  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, data["examples"], [], partial(collate, pad_id=data["pad_id"]), cfg, Path(run_dir), progress=False)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # cumulative elapsed_s / tokens -> per step
    previous = [{"elapsed_s": 0.0, "tokens": 0}] + rows[:-1]
    steps = [{"loss": r["loss"], "seconds": r["elapsed_s"] - p["elapsed_s"], "tokens": r["tokens"] - p["tokens"],
              "grad_norm": r["grad_norm"]} for r, p in zip(rows, previous, strict=True)]
    return {"baseline_rss_mib": baseline, "load_s": load_s, "peak_after_load_mib": load_peak, "steps": steps,
            "same_initial_a": same_init}


def run_ours_cli(args: argparse.Namespace, data: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """``qlorakit train`` itself (``qlorakit.cli.main.main`` in this process) with only model, data, shape, dtype
    and step flags: its defaults otherwise (memory budget planner, allocator, fused LoRA with dropout 0.05,
    paged or resident AdamW as the planner picks); per-step times from its metrics.jsonl."""
    from qlorakit.cli.main import main as qlorakit_main
    from qlorakit.hardware import current_rss_mb

    baseline = current_rss_mb()
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["train", "--model", model_dir, "--data", data["data_path"], "--output-dir", run_dir, "--overwrite",
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum",
                str(args.grad_accum), "--max-seq-len", str(args.seq_len), "--lora-r", str(RANK), "--lora-alpha",
                str(ALPHA), "--lora-dropout", str(args.lora_dropout), "--warmup-ratio", "0", "--compute-dtype",
                args.dtype, "--no-progress"]  # fmt: skip
        if args.ours_memory_budget:
            argv += ["--memory-budget", args.ours_memory_budget]
        if args.ours_no_packing:  # a labelled check (the peer's batches, so the loss curves compare), not the default
            argv += ["--no-packing"]
        start = time.perf_counter()
        status = qlorakit_main(argv)
        if status != 0:
            raise RuntimeError(f"qlorakit train exited with {status}")
        wall_s = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        chosen = (Path(run_dir) / "config.yaml").read_text()
    rows = [r for r in rows if "loss" in r]
    previous = [{"elapsed_s": 0.0, "tokens": 0}] + rows[:-1]
    steps = [{"loss": r["loss"], "seconds": r["elapsed_s"] - p["elapsed_s"], "tokens": r["tokens"] - p["tokens"],
              "grad_norm": r["grad_norm"]} for r, p in zip(rows, previous, strict=True)]
    return {"baseline_rss_mib": baseline, "load_s": 0.0, "peak_after_load_mib": 0.0, "steps": steps,
            "wall_s": wall_s, "argv": argv[1:], "config_yaml": chosen}  # fmt: skip


def _peer_model(model_dir: str, workdir: Path | None, dtype: str, dropout: float = 0.0) -> Any:
    """transformers + bitsandbytes NF4 (DQ, compute dtype), prepare_model_for_kbit_training, peft LoRA, our A.

    ``workdir`` None keeps peft's own initial A (for memory probes, where the values do not matter).
    """
    import peft
    import torch
    import transformers
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=getattr(torch, dtype))  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=getattr(torch, dtype), device_map={"": "cpu"})
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(TARGETS), bias="none",
                             task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, config)
    if workdir is None:
        model.config.use_cache = False
        return model
    init = load_file(workdir / INIT_A)  # qlorakit's initial A by module path
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if layers.keys() != init.keys() or any(m.lora_B["default"].weight.any() for m in layers.values()):
        raise RuntimeError("peft's LoRA layers differ from qlorakit's, or a B does not start at 0")
    with torch.no_grad():
        for path, layer in layers.items():
            layer.lora_A["default"].weight.copy_(init[path])
    model.config.use_cache = False
    return model


def run_theirs(args: argparse.Namespace, data: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """The standard stack: same batches, same loss function, torch AdamW, a plain loop (timed as ours)."""
    import bitsandbytes  # imported before the baseline, like qlorakit on the other side
    import peft  # noqa: F401
    import torch

    from qlorakit.data import collate
    from qlorakit.hardware import current_rss_mb, peak_rss_mb
    from qlorakit.train.loss import (
        reference_loss_sum,  # the standard full-logits loss, as transformers computes it
        target_tokens,
    )

    baseline, start = current_rss_mb(), time.perf_counter()
    model = _peer_model(model_dir, args.workdir, args.dtype, args.lora_dropout)
    load_s, load_peak = time.perf_counter() - start, peak_rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    torch.set_flush_denormal(True)  # as qlorakit's trainer does
    torch.manual_seed(SEED)
    model.train()  # bitsandbytes' bf16 CPU inference repack only happens in eval mode without grad
    steps, ga, examples = [], args.grad_accum, data["examples"]
    for step in range(args.steps):
        started = time.perf_counter()
        micro = data["order"][step * ga : (step + 1) * ga]
        batches = [collate([examples[i] for i in indices], data["pad_id"]) for indices in micro]
        n_target = max(sum(target_tokens(b) for b in batches), 1)
        total, tokens = 0.0, 0
        for batch in batches:
            loss_sum, _ = reference_loss_sum(model, batch)
            (loss_sum / n_target).backward()
            total, tokens = total + float(loss_sum) / n_target, tokens + int(batch["attention_mask"].sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        steps.append({"loss": total, "seconds": seconds, "tokens": tokens, "grad_norm": grad_norm})
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    return {"baseline_rss_mib": baseline, "load_s": load_s, "peak_after_load_mib": load_peak, "steps": steps,
            "linear4bit_modules": len(states),
            "repacked_for_cpu_inference": any(getattr(q, "packing_format_for_cpu", False) for q in states)}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One training run of ``args.worker`` in this (fresh) interpreter, measured here."""
    import torch
    import transformers  # noqa: F401 — both stacks build transformers models: imported before either baseline

    torch.set_num_threads(args.threads)
    from qlorakit.hardware import peak_rss_mb

    data = json.loads((args.workdir / "data.json").read_text())
    ours = run_ours_cli if args.ours_mode == "cli" else run_ours
    run = (ours if args.worker == "ours" else run_theirs)(args, data, args.model_dir)
    timed = run["steps"][args.warmup :]
    seconds, tokens = sum(s["seconds"] for s in timed), sum(s["tokens"] for s in timed)
    return {**run, "kind": args.worker, "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "peak_rss_mib": peak_rss_mb(), "threads": torch.get_num_threads()}


# --- the driver: prepare, alternate runs, summarize ---------------------------------------------------


def _child(args: argparse.Namespace, *extra: str) -> Any:
    """Run this script in a fresh interpreter with the driver's flags + ``extra``; its last stdout line is JSON."""
    return run_child(__file__, [*args.argv, *extra], env={"TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)})


def _loss_diff(a: list[dict], b: list[dict]) -> list[float]:
    return [abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)]


def model_flops_per_s(run: dict[str, Any], prep: dict[str, Any], warmup: int) -> float:
    """Model FLOPs of the timed steps / their seconds: ``(4 N_base + 6 N_lora) tokens + attention`` (MFU_FORMULA)."""
    dense = 4 * prep["base_params"] + 6 * prep["lora_params"]
    steps = run["steps"][warmup:]
    flops = sum(dense * s["tokens"] for s in steps) + sum(prep["attention_flops_per_step"][warmup:])
    return flops / sum(s["seconds"] for s in steps)


def summarize(runs: dict[str, list[dict[str, Any]]], prep: dict[str, Any], peak_gflops: float, warmup: int) -> dict:
    """Medians per stack, MFU, ours/theirs ratios, loss curves and how far they (and the repeats) differ."""
    for rs in runs.values():
        for r in rs:
            r["mfu"] = model_flops_per_s(r, prep, warmup) / (peak_gflops * 1e9)
    keys = ("tokens_per_s", "s_per_step", "mfu", "peak_rss_mib", "baseline_rss_mib", "peak_after_load_mib", "load_s")
    median = medians(runs, keys)
    for m in median.values():
        m["peak_minus_baseline_mib"] = m["peak_rss_mib"] - m["baseline_rss_mib"]
    ratio = {key: median["ours"][key] / median["theirs"][key] for key in median["ours"]}
    curves = {k: [s["loss"] for s in rs[0]["steps"]] for k, rs in runs.items()}
    diff = _loss_diff(runs["ours"][0]["steps"], runs["theirs"][0]["steps"])
    spread = {k: max([0.0] + [max(_loss_diff(rs[0]["steps"], r["steps"])) for r in rs[1:]]) for k, rs in runs.items()}
    return {"median": median, "ratio_ours_over_theirs": ratio, "loss_curves": curves,
            "final_loss": {k: c[-1] for k, c in curves.items()}, "loss_abs_diff_per_step": diff,
            "loss_max_abs_diff": max(diff), "loss_max_abs_diff_between_repeats": spread,
            "peak_gflops": peak_gflops, "ours_choices": _choices(runs["ours"][0])}  # fmt: skip


def _choices(run: dict[str, Any]) -> list[str]:
    """The memory choices ``qlorakit train`` wrote as comments at the end of its config.yaml (cli mode)."""
    return [line[2:].strip() for line in run.get("config_yaml", "").splitlines() if line.startswith("# ")]


COLUMNS = (("tok/s", "tokens_per_s", ".1f"), ("s/step", "s_per_step", ".2f"), ("MFU %", "mfu", ".1%"),
           ("peak MiB", "peak_rss_mib", ".0f"), ("base MiB", "baseline_rss_mib", ".0f"),
           ("peak-base", "peak_minus_baseline_mib", ".0f"), ("peak@load", "peak_after_load_mib", ".0f"),
           ("load s", "load_s", ".1f"))  # fmt: skip


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """The one table: medians per stack, then ours/theirs; loss columns first/last step."""
    head = f"{'stack':<22}" + "".join(f"{t:>11}" for t, _, _ in COLUMNS) + f"{'loss 1':>9}{'loss N':>9}"
    print(head + "\n" + "-" * len(head))
    for kind, name in (("ours", "qlorakit"), ("theirs", "transformers+bnb+peft")):
        med, curve = summary["median"][kind], summary["loss_curves"][kind]
        cells = "".join(f"{format(med[key], fmt).replace('%', ''):>11}" for _, key, fmt in COLUMNS)
        print(f"{name:<22}{cells}{curve[0]:>9.4f}{curve[-1]:>9.4f}")
    ratio = summary["ratio_ours_over_theirs"]
    cells = "".join(f"{ratio[key]:>11.2f}" for _, key, _ in COLUMNS)
    print(f"{'ours / theirs':<22}{cells}")
    loss_chunk = "default" if args.ours_loss_chunk is None else args.ours_loss_chunk
    mmap_kib = "default" if args.ours_mmap_kib is None else args.ours_mmap_kib
    ours = (f"ours: qlorakit train defaults, planner chose: {'; '.join(summary['ours_choices'][1:])}"
            if args.ours_mode == "cli" else f"ours: library, checkpointing {args.ours_checkpointing}, loss chunk "
            f"{loss_chunk}, mmap threshold {mmap_kib} KiB")  # fmt: skip
    print(f"median of {args.repeats} runs each; {args.steps} steps, first {args.warmup} untimed; batch "
          f"{args.batch_size} x {args.grad_accum}, <= {args.seq_len} tokens; {args.threads} threads; {args.dtype}; "
          f"dropout {args.lora_dropout} ({ours}); matmul peak "
          f"{summary['peak_gflops']:.1f} GFLOP/s; loss curves max |diff| {summary['loss_max_abs_diff']:.2e}")
    extras = extras_present()
    print("environment: " + (f"also has {', '.join(extras)} (imported by torch/transformers in both stacks; a user's "
                             "install has neither: benchmarks/user_env.sh)" if extras else "a user's install"))


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    from qlorakit.hardware import (
        speed_flags,  # imports torch: only in the end, after every child ran
    )

    versions = {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "qlorakit")}
    return {"cpu": cpu_model(), "cpu_flags": speed_flags(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "versions": versions | {"python": sys.version.split()[0], "qlorakit_git_head": git_head()},
            "extras_present": extras_present()}  # [] = a user's install (benchmarks/user_env.sh)


MFU_FORMULA = (
    "model FLOPs per second / peak matmul FLOP/s (same dtype, same threads), model FLOPs of a step = "
    "(2 N_base + 2 N_base + 2 N_lora + 4 N_lora) * tokens + 12 * layers * heads * head_dim * sum over sequences of "
    "n(n+1)/2: forward 2N; backward of the frozen 4-bit base only the input gradient 2N_base; LoRA input + weight "
    "gradients 4N_lora; causal attention QK^T and AV (forward 4 per query-key pair and unit width, backward 8). "
    "N_base counts the tied embedding once, as the head. Recomputation (gradient checkpointing) and the head rows "
    "the chunked loss skips are not counted: it is the same model work for both stacks."
)

NOTES = (
    "bitsandbytes 0.50 repacks Linear4bit into a bf16 AVX512 inference layout only in eval mode without grad; the "
    "peer trains, so its fp32 dequantize + F.linear path is measured (repacked_for_cpu_inference: false). Loss "
    "curves: bitsandbytes dequantizes with its C++ kernel and calls F.linear, qlorakit dequantizes in torch and "
    "calls x @ W.T, peft adds the LoRA branch to a clone; max |diff| 0 means all this gave the same fp32 values."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=str(GGUF), help="the GGUF to convert once to fp32 safetensors")
    p.add_argument("--data", default=None, help="training data file (default: qlorakit's bundled OASST1 sample)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="runs per stack, alternating ours/theirs (median)")
    p.add_argument("--seq-len", type=int, default=512, help="max tokens per example (max_seq_len)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in both children")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul for the peak")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype of BOTH stacks")
    p.add_argument("--ours-mode", choices=("cli", "library"), default="cli",
                   help="cli: `qlorakit train` with its defaults (the headline); library: qlorakit.train.train with "
                        "the --ours-* settings below")
    p.add_argument("--ours-memory-budget", default="",
                   help="cli mode: pass --memory-budget SIZE to qlorakit train (default: its own, the available "
                        "memory minus a margin)")
    p.add_argument("--ours-no-packing", action="store_true",
                   help="cli mode: pass --no-packing (the peer's padded batches, so the loss curves can be compared; "
                        "not qlorakit's default)")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="LoRA dropout of both stacks (the paper's and qlorakit's default 0.05)")
    p.add_argument("--ours-checkpointing", choices=("on", "off"), default="on",
                   help="qlorakit's gradient checkpointing (the peer's is always on, the standard QLoRA recipe)")
    p.add_argument("--ours-loss-chunk", type=int, default=None,
                   help="qlorakit's MemoryConfig.loss_chunk_tokens "
                        "(0 = full logits, as the peer; default: MemoryConfig's)")
    p.add_argument("--ours-mmap-kib", type=int, default=None,
                   help="qlorakit's MemoryConfig.malloc_mmap_threshold_kib "
                        "(0 = glibc's default, as the peer; default: MemoryConfig's)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache of the converted model and data")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # passed on to the children
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    return args


def _run_all(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list], list[float]]:
    """Prepare, measure the matmul peak, run the stacks alternately, measure the peak again."""
    (args.workdir / INIT_A).unlink(missing_ok=True)  # the first qlorakit run of this invocation writes it
    prep = _child(args, "--prepare")
    peaks = [_child(args, "--peak", "--matmul-n", str(args.matmul_n))]
    print(f"prepared {prep['examples']} examples, model {prep['model_dir']}; "
          f"{args.dtype} matmul peak {peaks[0]:.1f} GFLOP/s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    for repeat in range(args.repeats):
        for kind in ("ours", "theirs"):
            run = _child(args, "--worker", kind, "--model-dir", prep["model_dir"])
            runs[kind].append(run)
            print(f"  {repeat + 1}/{args.repeats} {kind:<6}: {run['tokens_per_s']:.1f} tok/s, "
                  f"{run['s_per_step']:.2f} s/step, peak {run['peak_rss_mib']:.0f} MiB, "
                  f"loss {run['steps'][-1]['loss']:.4f}", flush=True)  # fmt: skip
    peaks.append(_child(args, "--peak", "--matmul-n", str(args.matmul_n)))
    return prep, runs, peaks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker or args.prepare or args.peak:
        def peak(a: argparse.Namespace) -> float:
            return matmul_peak(a.matmul_n, a.threads, a.dtype)

        child = worker if args.worker else prepare if args.prepare else peak
        print(json.dumps(child(args)))
        return 0
    started, load_start = time.perf_counter(), os.getloadavg()
    prep, runs, peaks = _run_all(args)
    summary = summarize(runs, prep, max(peaks), args.warmup)
    load_end = os.getloadavg()
    print_table(summary, args)
    write_result(args.output, {
        "benchmark": "train_throughput", "description": __doc__.split("\n", 1)[0],
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/train_throughput.py", *args.argv]),
        "environment": _environment(args), "loadavg_start": load_start, "loadavg_end": load_end,
        "config": {"model": args.model, "data": prep["data"], "steps": args.steps, "warmup_steps": args.warmup,
                   "repeats": args.repeats, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "grad_accum": args.grad_accum, "lora_r_alpha_dropout": [RANK, ALPHA, args.lora_dropout],
                   "targets": TARGETS, "ours_mode": args.ours_mode, "ours_memory_budget": args.ours_memory_budget,
                   "ours_no_packing": args.ours_no_packing,
                   "adamw_lr_clip_wd": [LR, CLIP, 0.0], "seed": SEED, "dtype": args.dtype,
                   "ours_checkpointing": args.ours_checkpointing, "ours_loss_chunk_tokens": args.ours_loss_chunk,
                   "ours_malloc_mmap_threshold_kib": args.ours_mmap_kib},
        "prepared": prep, "matmul_peak_gflops": {"start": peaks[0], "end": peaks[1]},
        "mfu_formula": MFU_FORMULA,
        **summary, "note": NOTES, "runs": runs, "total_seconds": time.perf_counter() - started,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
