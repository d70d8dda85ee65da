"""Typed, validated configuration dataclasses: the single home of every default.

A run's config (``RunConfig``) has one section per concern: ``quant`` (the 4-bit base), ``lora`` (the
adapters), ``data``, ``train`` (the loop: steps, batch, seed, saving, logging, compute dtype), ``optim``
(optimizer and schedule), ``memory`` (memory and speed choices inside a step), ``eval`` (evaluation
during training), ``parallel`` (several processes under torchrun) and ``objective`` (SFT, DPO or ORPO).
Each section validates itself on construction and names the offending field;
``from_dict`` builds one from a plain mapping (YAML/JSON/CLI) and rejects unknown keys. A file written
before the sections existed (optimizer, memory and evaluation keys under ``train:``) still loads:
``upgrade_layout`` moves each such key to its section with one deprecation message. Defaults follow the
QLoRA paper's released training script (see DESIGN.md, "Training defaults"); allowed values live in
``qlorakit.constants``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qlorakit.config_fields import (
    as_dict,
    bool_fields,
    choice_field,
    fail,
    from_dict,
    int_field,
    opt,
    parse_size,
    report_targets,
)
from qlorakit.constants import (
    BASE_QUANT_TYPES,
    BLOCKSIZES,
    COMPUTE_DTYPES,
    DATA_FORMATS,
    DIST_TIMEOUT_S,
    DISTRIBUTED_STRATEGIES,
    DPO_REFERENCES,
    FINETUNE_FULL,
    FINETUNE_LORA,
    FINETUNE_MODES,
    FSDP_LOAD_BROADCAST,
    FSDP_LOAD_MODES,
    LORA_INITS,
    LOSS_CHUNK_TOKENS,
    OPTIMIZER_NAMES,
    QUANT_NONE,
    SCHEDULERS,
    TRAIN_METHODS,
)
from qlorakit.errors import ConfigError


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base weights are stored (QLoRA: NF4, blocksize 64, double quantization).

    ``quant_type="none"`` keeps the base linears as ``nn.Linear`` in the compute dtype (LoRA on a 16/32-bit
    base, the paper's baseline); ``blocksize`` and ``double_quant`` are then unused.
    """

    quant_type: str = opt("nf4", "data type of the frozen base: nf4, fp4, int4 (4-bit) or none (kept 16/32-bit)")
    blocksize: int = opt(64, "values sharing one absmax scale (power of two, 32..4096)")
    double_quant: bool = opt(True, "quantize the absmax scales again to 8 bit (saves 0.373 bits/param)")

    def __post_init__(self) -> None:
        choice_field(self, "quant_type", BASE_QUANT_TYPES)
        if self.blocksize not in BLOCKSIZES:
            fail("QuantConfig", "blocksize", self.blocksize, f"use a power of two in 32..4096 {BLOCKSIZES}")
        bool_fields(self, "double_quant")

    @property
    def quantized(self) -> bool:
        """Whether the base is stored in 4 bits (``quant_type`` is not ``"none"``)."""
        return self.quant_type != QUANT_NONE


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: ``y = W x + (alpha / r) * B A dropout(x)`` on every target linear.

    ``targets`` is ``"all-linear"`` (every linear inside the decoder blocks, never ``lm_head``), a list of
    module-name suffixes (``["q_proj", "v_proj"]``), or a regular expression matched against full
    module names (given as ``"re:<pattern>"``). ``rslora`` scales by ``alpha / sqrt(r)`` instead.
    ``init``: ``default`` (A Kaiming-uniform, B zeros), ``gaussian`` (A ~ N(0, 1/r), B zeros),
    ``zeros`` (both zero; for loading). ``dora`` adds DoRA's magnitude vector (``y = b + m/||W + s B A||_row *
    (W x + s B A x)``, the norm detached; ``lora/dora.py``), saved as PEFT's ``lora_magnitude_vector``.
    """

    r: int = opt(64, "LoRA rank")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = opt(0.05, "dropout on the adapter input, in [0, 1)")
    targets: str | tuple[str, ...] = opt("all-linear", "all-linear, comma-separated names, or re:<regex>")
    rslora: bool = opt(False, "scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    init: str = opt("default", "adapter init: default (Kaiming A, zero B), gaussian, zeros")
    bias: str = opt("none", "bias training: only 'none' (biases stay frozen)")
    dora: bool = opt(False, "DoRA: weight-decomposed LoRA, a trained magnitude per output feature (docs/design.md)")

    def __post_init__(self) -> None:
        bool_fields(self, "dora")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        int_field(self, "r", 1, "the rank must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            fail("LoraConfig", "alpha", self.alpha, "must be a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            fail("LoraConfig", "dropout", self.dropout, "must be in [0, 1)")
        choice_field(self, "init", LORA_INITS)
        if self.bias != "none":
            fail("LoraConfig", "bias", self.bias, "only 'none' is supported (biases stay frozen)")
        if isinstance(self.targets, str):
            if self.targets.startswith("re:"):
                try:
                    re.compile(self.targets[3:])
                except re.error as exc:
                    fail("LoraConfig", "targets", self.targets, f"invalid regular expression ({exc})")
            elif self.targets != "all-linear" and not self.targets:
                fail("LoraConfig", "targets", self.targets, "use 'all-linear', a list of names or 're:<regex>'")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            fail("LoraConfig", "targets", self.targets, "a list of target names must be non-empty strings")

    @property
    def scale(self) -> float:
        """The factor applied to ``B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (self.r**0.5 if self.rslora else self.r)


@dataclass(frozen=True)
class DataConfig:
    """Training data: files, format, prompt/answer lengths and batching.

    ``source_max_len`` / ``target_max_len`` bound the prompt and the answer tokens (paper: 1024 / 256);
    ``train_on_source`` also puts loss on prompt tokens; ``block_size`` is the length of packed blocks
    for the ``text`` format; ``val_size`` is a fraction (< 1) or a count (>= 1) of examples held out.
    ``packing`` lays training examples out in rows of ``seq_limit`` tokens without padding between them
    (``data/packing.py``, ``train/packed.py``); held-out loss is always computed unpacked.
    """

    paths: tuple[str, ...] = opt(
        (), "training data files (JSON, JSONL, CSV, Parquet, TXT); default: the bundled OASST1 sample"
    )
    format: str = opt("auto", "data format: auto, alpaca, dolly, oasst1, messages, self-instruct, text, preference")
    source_max_len: int = opt(1024, "max prompt tokens (longer prompts are truncated and counted)")
    target_max_len: int = opt(256, "max answer tokens per assistant turn (truncated and counted)")
    max_seq_len: int = opt(0, "max tokens of a whole example, 0 = source + target max (truncated and counted)")
    train_on_source: bool = opt(False, "also put loss on prompt tokens")
    block_size: int = opt(512, "length of packed blocks for the text format")
    group_by_length: bool = opt(True, "batch examples of similar length together")
    val_size: float = opt(0.0, "held-out examples: a fraction < 1 or a count >= 1")
    seed: int = opt(42, "seed of the validation split and the batch order")
    chat_template: bool = opt(True, "render messages/oasst1 with the tokenizer's chat template when it has one")
    packing: bool = opt(True, "pack training examples into rows of max_seq_len tokens, each attending only to "
                        "itself (batch_size then counts rows); used when a check shows the model's attention "
                        "keeps packed examples apart, else the run trains unpacked and says why (docs/packing.md)")

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        elif isinstance(self.paths, list):
            object.__setattr__(self, "paths", tuple(self.paths))
        choice_field(self, "format", DATA_FORMATS)
        int_field(self, "max_seq_len", 0)
        bool_fields(self, "packing")
        for name in ("source_max_len", "target_max_len", "block_size"):
            int_field(self, name, 1, "must be a positive integer")
        if not isinstance(self.val_size, (int, float)) or self.val_size < 0:
            fail("DataConfig", "val_size", self.val_size, "a fraction in [0, 1) or a count >= 1")

    @property
    def seq_limit(self) -> int:
        """The effective whole-example token limit."""
        return self.max_seq_len or self.source_max_len + self.target_max_len


@dataclass(frozen=True)
class TrainConfig:
    """The training loop. Paper: an effective batch of 16 (1 x 16 accumulation). ``max_steps`` > 0 overrides
    ``epochs``; ``save_steps`` 0 = only at the end. ``compute_dtype`` "auto" picks bfloat16 where the hardware
    runs it well (a CUDA GPU with bf16 or a CPU with AVX512_BF16/AMX) and float32 otherwise.
    ``save_on_preempt`` and ``max_bad_steps``: the graceful stop and the numerical guard (docs/reliability.md).
    ``finetune``: ``lora`` trains adapters on the frozen base; ``full`` trains every weight of the model
    (embeddings, every linear, norms, ``lm_head``; a tied head once), needs ``quant.quant_type: none`` and fp32
    compute, and saves a whole model instead of an adapter (``qlorakit.train.full``; the ``lora`` section is unused).
    """

    output_dir: str = opt("runs/qlorakit", "run directory (config, metrics, checkpoints, adapter, plot)")
    max_steps: int = opt(0, "optimizer steps; 0 = run for --epochs")
    epochs: float = opt(1.0, "passes over the data when max_steps is 0")
    batch_size: int = opt(1, "examples per micro-batch of the whole job (with N ranks each takes batch_size / N)")
    grad_accum: int = opt(16, "micro-batches per optimizer step (effective batch = batch_size x grad_accum)")
    seed: int = opt(42, "seed of initialization and dropout")
    save_steps: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = opt(2, "checkpoints to keep (0 = all)")
    logging_steps: int = opt(1, "write a metrics row every N steps")
    compute_dtype: str = opt("auto", "float32, bfloat16, float16, or auto (bf16 where the hardware runs it well)")
    save_on_preempt: bool = opt(True, "on SIGINT/SIGTERM finish the current step, write a checkpoint and exit "
                                "130/143 (docs/reliability.md); off = Python's default handling")
    max_bad_steps: int = opt(3, "stop with an error after this many steps in a row whose update was skipped for a "
                             "non-finite loss or gradient norm")
    report_to: tuple[str, ...] = opt(("none",), "run trackers besides metrics.jsonl: none, tensorboard, wandb, mlflow "
                                     "(comma-separated or repeated; the 'tracking' extra; docs/design.md)")
    finetune: str = opt(FINETUNE_LORA, "what trains: lora (adapters on the frozen base) or full (every weight; needs "
                        "--quant-type none and fp32; saves a whole model in <run>/model)")

    def __post_init__(self) -> None:
        bool_fields(self, "save_on_preempt")
        object.__setattr__(self, "report_to", report_targets(self.report_to))
        for name in ("batch_size", "grad_accum", "logging_steps", "max_bad_steps"):
            int_field(self, name, 1)
        for name in ("max_steps", "save_steps", "save_total_limit"):
            int_field(self, name, 0)
        if not isinstance(self.epochs, (int, float)) or self.epochs <= 0:
            fail("TrainConfig", "epochs", self.epochs, "must be > 0")
        choice_field(self, "compute_dtype", ("auto",) + COMPUTE_DTYPES)
        choice_field(self, "finetune", FINETUNE_MODES)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule. Paper: paged AdamW, lr 2e-4, constant schedule after 3% warmup,
    weight decay 0, max grad-norm 0.3."""

    optim: str = opt("paged_adamw", "optimizer: adamw, adamw8bit, paged_adamw (the paper's), paged_adamw8bit")
    lr: float = opt(2e-4, "peak learning rate")
    scheduler: str = opt("constant", "learning-rate schedule after warmup: constant, cosine, linear")
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up linearly from 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(0.3, "clip the global gradient norm to this (0 = no clipping)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    optim_budget: int = opt(0, "resident MiB for paged optimizer state (0 = twice the largest parameter's state)")

    def __post_init__(self) -> None:
        choice_field(self, "optim", OPTIMIZER_NAMES)
        choice_field(self, "scheduler", SCHEDULERS)
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            fail("OptimConfig", "lr", self.lr, "must be > 0")
        int_field(self, "optim_budget", 0, "MiB, an integer >= 0")
        if self.optim_budget and not self.optim.startswith("paged_"):
            fail("OptimConfig", "optim_budget", self.optim_budget,
                  f"applies to paged optimizers; optim is {self.optim!r}")
        if not 0 <= self.warmup_ratio < 1:
            fail("OptimConfig", "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            fail("OptimConfig", "weight_decay/max_grad_norm", (self.weight_decay, self.max_grad_norm), "must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_eps <= 0:
            fail("OptimConfig", "adam_beta1/adam_beta2/adam_eps", (self.adam_beta1, self.adam_beta2, self.adam_eps),
                  "betas in [0, 1), eps > 0")


def checkpointed_blocks(enabled: bool, count: int, num_layers: int) -> int:
    """How many of ``num_layers`` decoder blocks recompute in backward: none without checkpointing, else the first
    ``count`` (``MemoryConfig.checkpoint_blocks``; 0, or more than there are, means all)."""
    if not enabled:
        return 0
    return num_layers if count <= 0 else min(count, num_layers)


@dataclass(frozen=True)
class MemoryConfig:
    """Memory and speed choices inside a step. Each has a reference path and a test holding it to it; each
    is a row of ``train.rewrites`` except ``loss_chunk_tokens`` (an argument of the loss). Paper: gradient
    checkpointing on."""

    gradient_checkpointing: bool = opt(True, "recompute activations in backward to save memory")
    checkpoint_blocks: int = opt(0, "with gradient_checkpointing: how many decoder blocks recompute, the first ones "
                                 "(0 = every block); the others keep their activations (faster, more memory)")
    loss_chunk_tokens: int = opt(LOSS_CHUNK_TOKENS, "target tokens per chunk of the head + cross-entropy, which "
                                 "never holds all logits at once (0 = full logits, the reference)")
    fuse_lora: bool = opt(True, "one LoRA down-projection for projections that share an input (q/k/v, gate/up); "
                          "same adapters and files, fewer matmuls")
    recompute_swiglu: bool = opt(True, "SwiGLU MLPs keep gate and up for backward and recompute silu(gate) there "
                                 "(less activation memory, bit-identical values)")
    fuse_rmsnorm: bool = opt(True, "RMSNorms as one autograd function (fewer temporaries; same values to fp32 "
                             "rounding; 16-bit inputs kept as they came, not upcast)")
    rebuild_adapter_inputs: bool = opt(True, "without checkpointing, the norm outputs and SwiGLU product that only "
                                       "LoRA A's backward reads are rebuilt there, not kept (bit-identical)")
    fuse_up_projection: bool = opt(True, "LoRA layers add scale * u B^T to the base output with one addmm "
                                   "(LoraLinear.fuse_up_projection; fewer full-size temporaries)")
    reuse_dequant_buffer: bool = opt(True, "the CPU 4-bit matmul dequantizes into one reused buffer "
                                     "(Linear4bit.reuse_dequant_buffer) instead of a new tensor per layer")
    use_gemv: bool = opt(True, "4-bit layers given at most 16 rows without grad skip building the weight "
                         "(Linear4bit.use_gemv; evaluation)")
    malloc_mmap_threshold_kib: int = opt(1024, "glibc: allocations of this many KiB or more are returned to the OS "
                                         "when freed (lower peak RSS, more page faults); 0 = glibc's dynamic threshold")
    arena: bool = opt(False, "CPU: torch's tensors of 64 KiB or more come from qlorakit's caching arena (train.arena: "
                      "freed blocks reused best fit, few page faults, no heap creep; built with the C++ compiler "
                      "on first use, glibc's allocator where it cannot be)")
    malloc_trim: bool = opt(False, "glibc: after each optimizer step return the heap's free pages to the OS "
                            "(malloc_trim; between steps only: it did not lower the peak, docs/memory.md)")
    malloc_trim_blocks: bool = opt(False, "glibc: malloc_trim at the start of each decoder block's forward, so the "
                                   "forward's freed temporaries do not stay resident (lower peak with the dynamic "
                                   "threshold; some page faults)")
    memory_budget: str = opt("", "peak memory the run may use, e.g. 8GB or 6GiB; qlorakit train picks the fastest "
                             "memory settings that fit ('' = available memory minus a margin; on CUDA the device's "
                             "free memory); settings given explicitly are kept; with glibc's dynamic threshold a CPU "
                             "run fixes the threshold once its peak nears the budget (the heap guard)")

    def __post_init__(self) -> None:
        bool_fields(self, "gradient_checkpointing", "fuse_lora", "recompute_swiglu", "fuse_rmsnorm",
                     "rebuild_adapter_inputs", "fuse_up_projection", "reuse_dequant_buffer", "use_gemv", "malloc_trim",
                     "malloc_trim_blocks", "arena")
        int_field(self, "loss_chunk_tokens", 0)
        int_field(self, "checkpoint_blocks", 0)
        int_field(self, "malloc_mmap_threshold_kib", 0)
        if not isinstance(self.memory_budget, str):
            fail("MemoryConfig", "memory_budget", self.memory_budget, "a size such as 8GB or 6GiB, or ''")
        if self.memory_budget:
            try:
                parse_size(self.memory_budget)
            except ConfigError as error:
                fail("MemoryConfig", "memory_budget", self.memory_budget, str(error))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training: the held-out loss every ``eval_steps`` (0 = at start and end only), and,
    at each evaluation after a step, the perplexity of a text file and MMLU accuracy (docs/eval.md)."""

    eval_steps: int = opt(0, "evaluate the held-out loss every N steps (0 = at start and end only)")
    eval_ppl_file: str = opt("", "at each evaluation after a step also log the perplexity of this text file "
                             "(.txt, or .jsonl with 'text'); '' = off")
    eval_ppl_max_seq_len: int = opt(1024, "window of that perplexity, in tokens")
    eval_ppl_stride: int = opt(512, "stride of that perplexity's sliding window (<= eval_ppl_max_seq_len)")
    eval_mmlu_dir: str = opt("", "at each evaluation after a step also log MMLU accuracy from this folder "
                             "(dev/ and test/ CSV files); '' = off")
    eval_mmlu_shots: int = opt(5, "few-shot examples of that MMLU evaluation")
    eval_mmlu_limit: int = opt(10, "test questions per MMLU subject at each evaluation (0 = all)")

    def __post_init__(self) -> None:
        for name, low in (("eval_steps", 0), ("eval_ppl_max_seq_len", 2), ("eval_ppl_stride", 1),
                          ("eval_mmlu_shots", 0), ("eval_mmlu_limit", 0)):
            int_field(self, name, low)
        if self.eval_ppl_stride > self.eval_ppl_max_seq_len:
            fail("EvalConfig", "eval_ppl_stride", self.eval_ppl_stride,
                  f"must be <= eval_ppl_max_seq_len ({self.eval_ppl_max_seq_len}), or tokens are never scored")
        for name in ("eval_ppl_file", "eval_mmlu_dir"):
            if not isinstance(getattr(self, name), str):
                fail("EvalConfig", name, getattr(self, name), "must be a path or ''")


@dataclass(frozen=True)
class ParallelConfig:
    """Several processes (``torchrun``; docs/distributed.md). Used only when ``WORLD_SIZE`` is set: ``auto``
    picks with the planner (DDP when a whole replica fits each rank, else FSDP), ``ddp`` replicates the 4-bit
    base and all-reduces the adapter gradients, ``fsdp`` shards the base per decoder block."""

    distributed: str = opt("auto", "under torchrun: auto, ddp or fsdp (ignored without WORLD_SIZE)")
    dist_timeout_s: int = opt(DIST_TIMEOUT_S, "seconds a collective waits for the other ranks before the run stops "
                              "with an error (a dead or hung rank)")
    fsdp_load: str = opt(FSDP_LOAD_BROADCAST, "how --distributed fsdp loads the 4-bit base: broadcast (rank 0 reads "
                         "it and sends each rank its shard), stream (each rank reads the checkpoint and keeps its own "
                         "shard) or whole (every rank loads all of it, then shards it); docs/distributed.md")

    def __post_init__(self) -> None:
        choice_field(self, "distributed", DISTRIBUTED_STRATEGIES)
        choice_field(self, "fsdp_load", FSDP_LOAD_MODES)
        int_field(self, "dist_timeout_s", 1)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What a step minimizes (``train.preference``, docs/preference.md): ``sft`` (the token-mean cross-entropy of
    the answers), ``dpo`` (Rafailov et al. 2023, sigmoid loss, the reference being the base with the adapters
    off) or ``orpo`` (Hong et al. 2024: the chosen answers' cross-entropy plus ``orpo_beta`` times the
    odds-ratio term; no reference). DPO and ORPO train on ``preference`` data (prompt, chosen, rejected)."""

    method: str = opt("sft", "training objective: sft, dpo or orpo (dpo/orpo need preference data)")
    dpo_beta: float = opt(0.1, "DPO's beta: the strength of the implicit KL penalty towards the reference")
    dpo_reference: str = opt("auto", "DPO reference log-probs: cached (once, before the first step, for every "
                             "pair), same-step (a no-grad forward with adapters off in every step and evaluation), "
                             "or auto: whichever scores fewer pairs for this run (printed in the plan)")
    orpo_beta: float = opt(0.1, "ORPO's lambda: the weight of the odds-ratio term beside the chosen answers' NLL")

    def __post_init__(self) -> None:
        choice_field(self, "method", TRAIN_METHODS)
        choice_field(self, "dpo_reference", DPO_REFERENCES)
        for name in ("dpo_beta", "orpo_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                fail("ObjectiveConfig", name, value, "must be a number > 0")


DEFAULT_MODEL = "smollm2-135m-instruct"

#: The sections of ``RunConfig`` (and of a config file), in the order ``config.yaml`` writes them.
SECTIONS: dict[str, type] = {"quant": QuantConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
                             "optim": OptimConfig, "memory": MemoryConfig, "eval": EvalConfig,
                             "parallel": ParallelConfig, "objective": ObjectiveConfig}

#: Keys that lived under ``train:`` before the config had sections -> their section now.
MOVED_FROM_TRAIN: dict[str, str] = {f.name: section for section in ("optim", "memory", "eval")
                                    for f in dataclasses.fields(SECTIONS[section])}


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; ``config.yaml`` in a run directory is this, as a mapping."""

    model: str = opt(
        DEFAULT_MODEL, "base model: a local HF dir, a .gguf file, a 4-bit bnb dir, a built-in alias or a hub id"
    )
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        if self.train.finetune == FINETUNE_FULL:
            check_full_finetune(self)
            if self.train.compute_dtype == "auto":  # full fine-tuning trains fp32 weights: auto is float32 here
                object.__setattr__(self, "train", dataclasses.replace(self.train, compute_dtype="float32"))

    @property
    def full_finetune(self) -> bool:
        """Whether every weight trains (``train.finetune: full``) rather than LoRA adapters."""
        return self.train.finetune == FINETUNE_FULL

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "config") -> RunConfig:
        """Build from nested mappings (a loaded YAML/JSON file); unknown keys fail with their path."""
        values = upgrade_layout(values, where)
        unknown = sorted(set(values) - set(SECTIONS) - {"model"})
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: model, {', '.join(SECTIONS)}")
        parts: dict[str, Any] = {}
        for key, section in SECTIONS.items():
            sub = values.get(key) or {}
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{where}: section '{key}' must be a mapping, got {type(sub).__name__}")
            parts[key] = from_dict(section, sub, f"{where}: {key}")
        model = values.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: 'model' must be a non-empty string, got {model!r}")
        return cls(model=model, **parts)


def check_full_finetune(cfg: RunConfig) -> None:
    """The combinations full fine-tuning refuses, each with the fix (checked when the config is built, so before
    any weight loads): a 4-bit base (its packed weights are frozen storage, they have no gradient), 16-bit
    weights (AdamW's updates of about ``lr`` relative fall below bf16/fp16 resolution without fp32 master
    weights, which qlorakit does not keep), DPO / ORPO (their reference is the base with the adapters off) and
    ``--distributed fsdp`` (it shards the 4-bit base and the adapters only)."""
    why = "train.finetune = 'full'"
    if cfg.quant.quantized:
        raise ConfigError(f"{why} trains every weight, but quant.quant_type = {cfg.quant.quant_type!r} stores the base "
                          "in 4 bits, frozen (no gradient reaches packed weights); pass --quant-type none, or "
                          "--finetune lora for QLoRA")
    if cfg.train.compute_dtype in ("bfloat16", "float16"):
        raise ConfigError(f"{why} keeps the trained weights in the compute dtype, and "
                          f"train.compute_dtype = {cfg.train.compute_dtype!r} would drop AdamW's small updates "
                          "(no fp32 master weights); pass --compute-dtype float32 (auto means float32 here)")
    if cfg.objective.method != "sft":
        raise ConfigError(f"{why}: objective.method = {cfg.objective.method!r} needs LoRA (its reference model is "
                          "the base with the adapters switched off); use --method sft, or --finetune lora")
    if cfg.parallel.distributed == "fsdp":
        raise ConfigError(f"{why}: parallel.distributed = 'fsdp' shards the 4-bit base and the adapters only; use "
                          "--distributed ddp (every rank holds the whole model) or one process")


def upgrade_layout(values: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """``values`` with every key of ``MOVED_FROM_TRAIN`` found under ``train`` moved to its section.

    Emits one ``FutureWarning`` naming each moved key and its new section; a key given in both places fails.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    train = out.get("train")
    moved = [key for key in train if key in MOVED_FROM_TRAIN] if isinstance(train, dict) else []
    for key in moved:
        section = out.get(MOVED_FROM_TRAIN[key]) or {}
        if not isinstance(section, dict):
            continue  # from_mapping reports the malformed section
        if key in section:
            raise ConfigError(f"{where}: '{key}' is given under both 'train' and '{MOVED_FROM_TRAIN[key]}'; "
                              f"keep {MOVED_FROM_TRAIN[key]}.{key}")
        section[key] = train.pop(key)
        out[MOVED_FROM_TRAIN[key]] = section
    if moved:
        names = ", ".join(f"train.{key} -> {MOVED_FROM_TRAIN[key]}.{key}" for key in moved)
        warnings.warn(f"{where}: these keys now live in their own sections (this layout still loads, but is "
                      f"deprecated): {names}", FutureWarning, stacklevel=3)
    return out


def parse_targets(text: str) -> str | tuple[str, ...]:
    """CLI spelling of ``LoraConfig.targets``: ``all-linear``, ``re:<regex>`` or ``q_proj,v_proj``."""
    if text == "all-linear" or text.startswith("re:"):
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


__all__ = [
    "COMPUTE_DTYPES",
    "DATA_FORMATS",
    "SECTIONS",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "MemoryConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "QuantConfig",
    "RunConfig",
    "TrainConfig",
    "as_dict",
    "from_dict",
    "parse_targets",
    "upgrade_layout",
]
