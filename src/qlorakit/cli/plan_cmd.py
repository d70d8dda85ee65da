"""``qlorakit plan``: how much memory QLoRA training of a model needs, part by part, and whether it fits.

MODEL is ``7b`` / ``13b`` / ``33b`` / ``65b`` (the LLaMA-1 shapes of the QLoRA paper), a ``config.json``,
a model directory, a ``.gguf`` file, an alias or a Hub id; only its config is read. The breakdown covers
the 4-bit weights, their quantization constants, the unquantized embeddings/head and norms, the LoRA
parameters, their gradients and optimizer state, activations, logits and the dequantization workspace
(see ``qlorakit.planner.estimate`` for every formula). ``--world-size N --distributed ddp|fsdp`` plans one
rank of an N-rank job (``--batch`` is then the job's micro-batch; ``qlorakit.planner.distributed``). Exit
code: 0 when it fits or no budget is given, 1 when it does not fit, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qlorakit.config import MemoryConfig
from qlorakit.constants import (
    BASE_QUANT_TYPES,
    COMPUTE_DTYPES,
    FINETUNE_FULL,
    FINETUNE_MODES,
    LOSS_CHUNK_TOKENS,
    OPTIMIZER_NAMES,
    TRAIN_METHODS,
)


def add_parser(subparsers: Any) -> None:
    """Register ``plan`` on ``subparsers``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan", help="memory needed to train a model with QLoRA, part by part, and whether it fits",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="7b|13b|33b|65b, config.json, directory, .gguf, alias")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default: %(default)s)")
    p.add_argument("--method", choices=TRAIN_METHODS, default="sft",
                   help="sft, or dpo / orpo: --batch counts pairs, each two sequences (default: %(default)s)")
    p.add_argument("--finetune", choices=FINETUNE_MODES, default="lora",
                   help="lora (adapters on the frozen base), or full: every weight trains, with its gradient and "
                        "optimizer state (needs --quant-type none; default: %(default)s)")
    p.add_argument("--r", type=int, default=64, help="LoRA rank (default: %(default)s)")
    p.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear, q_proj,v_proj or re:<regex>")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="adapter dropout (default: %(default)s)")
    p.add_argument("--lora-dora", action="store_true", help="DoRA adapters: count the magnitude vectors too")
    p.add_argument("--optim", default="paged_adamw", help=f"one of {', '.join(OPTIMIZER_NAMES)} (default: %(default)s)")
    p.add_argument("--optim-budget", type=int, default=0, metavar="MIB",
                   help="resident MiB of paged optimizer state (0 = twice the largest tensor's state)")
    p.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=True,
                   help="gradient checkpointing (the default)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no gradient checkpointing")
    p.add_argument("--checkpoint-blocks", type=int, default=0, metavar="N",
                   help="with checkpointing: only the first N decoder blocks recompute (default: 0 = all)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="plan for a GPU or the CPU (default: gpu)")
    p.add_argument("--compute-dtype", choices=("auto",) + COMPUTE_DTYPES, default="auto",
                   help="auto = bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--lora-dtype", choices=COMPUTE_DTYPES, default="float32", help="adapter dtype (qlorakit: float32)")
    p.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK_TOKENS,
                   help="rows of logits at once, as the trainer (default: %(default)s; 0 = full logits)")
    p.add_argument("--malloc-mmap-threshold-kib", type=int, default=MemoryConfig().malloc_mmap_threshold_kib,
                   help="CPU: the trainer's glibc mmap threshold (default: %(default)s; 0 = dynamic, more RSS)")
    p.add_argument("--arena", action="store_true",
                   help="CPU: the trainer's caching arena serves the tensors (MemoryConfig.arena; qlorakit train's "
                   "first allocator choice)")
    p.add_argument("--malloc-trim-blocks", action="store_true",
                   help="CPU: the trainer trims glibc's heap before each block's forward "
                   "(MemoryConfig.malloc_trim_blocks)")
    p.add_argument("--no-recompute-swiglu", dest="recompute_swiglu", action="store_false", default=True,
                   help="the trainer keeps SiLU(gate) for backward (MemoryConfig.recompute_swiglu false)")
    p.add_argument("--quant-type", choices=BASE_QUANT_TYPES, default="nf4",
                   help="storage of the frozen base: a 4-bit type, or none (LoRA on the 16/32-bit base)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true", help="plan without double quantization")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="plan one rank of an N-rank job; --batch is then the job's micro-batch (default: 1)")
    p.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp",
                   help="with --world-size > 1: ddp (whole replica per rank) or fsdp (base sharded, as train runs it)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="memory budget to check against, e.g. 48GB, 24GiB, 16000MiB")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object with <part>_bytes and total_bytes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate everything, read the shape, print the plan; exit 1 if it does not fit the budget."""
    from qlorakit.config import QuantConfig, parse_targets
    from qlorakit.planner import (
        PlanSettings,
        format_plan,
        model_shape,
        parse_size,
        plan,
    )

    budget = parse_size(args.gpu_mem) if args.gpu_mem else None
    settings = PlanSettings(
        seq_len=args.seq, batch_size=args.batch, lora_r=args.r, lora_dropout=args.lora_dropout, optim=args.optim,
        lora_dora=args.lora_dora,
        optim_budget_mib=args.optim_budget, gradient_checkpointing=args.grad_ckpt,
        checkpoint_blocks=args.checkpoint_blocks, device=args.device,
        compute_dtype=args.compute_dtype, lora_dtype=args.lora_dtype, loss_chunk=args.loss_chunk,
        mmap_threshold_kib=args.malloc_mmap_threshold_kib, recompute_swiglu=args.recompute_swiglu,
        quant=QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant),
        method=args.method, full_finetune=args.finetune == FINETUNE_FULL, malloc_trim_blocks=args.malloc_trim_blocks,
        arena=args.arena,
    )  # fmt: skip
    shape = model_shape(args.model, parse_targets(args.targets), trust_remote_code=args.trust_remote_code)
    if args.world_size != 1:
        from qlorakit.planner.distributed import per_rank_plan

        result = per_rank_plan(shape, settings, args.world_size, args.distributed, budget)
    else:
        result = plan(shape, settings, budget)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(result))
    return 1 if result.fits is False else 0
