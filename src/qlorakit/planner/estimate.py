"""Training memory of QLoRA, part by part: pure arithmetic on a ``ModelShape`` and ``PlanSettings``.

Notation: ``B`` batch, ``T`` sequence length, ``L`` layers, ``d`` hidden size, ``k`` key/value width
(``kv_heads * head_dim``), ``f`` feed-forward width, ``V`` vocabulary, ``n_i`` elements of quantized weight
``i``, ``b`` the quantization block size, ``r`` the LoRA rank, ``c`` / ``l`` bytes per value of the compute /
adapter dtype. Each part is bytes resident on the device (GPU memory, or RSS on the CPU):

- ``weights_4bit``      sum_i ceil(n_i / 2) — two 4-bit codes per byte (QLoRA section 3, NF4);
- ``quant_constants``   without double quant ``sum_i 4 ceil(n_i / b)`` (fp32 absmax); with it
  ``sum_i ceil(n_i / b) + 4 ceil(ceil(n_i / b) / 256) + 4`` (uint8 absmax, fp32 nested absmax, offset),
  plus the code tables (16 and 256 fp32 values) of each weight;
- ``embeddings``        input embeddings, an untied ``lm_head`` and other unquantized parameters at ``c``
  (the loader keeps them in the compute dtype); ``norms`` at 4 bytes (kept fp32);
- ``lora_params`` / ``lora_grads``  ``sum_adapted r (in + out) l`` each (DoRA: ``(r (in + out) + out) l``);
- ``dora_norm_workspace`` (DoRA only)  ``2 * 4 n_max``: the fp32 dequantized ``W`` and ``W + s B A`` whose
  row norms DoRA takes, one layer at a time;
- ``optimizer_state``   AdamW: two fp32 moments (8 bytes/value) or 8-bit (codes + fp32 absmax per 256);
  paged: only the resident budget of the paged tensors (the rest is ``offloaded_bytes``, host memory);
- ``activations``       tensors saved for backward. One Llama block saves per token
  ``4d + 2k + 3f`` values at ``c`` (layer input and residual: the norms keep them, at ``c`` with the trainer's
  fused RMSNorm, else at 4 bytes with 16-bit compute, where the module keeps its fp32 upcast; q, k, v after
  RoPE, the attention output, gate,
  SiLU(gate), up; ``2f`` with the trainer's default ``recompute_swiglu``, which recomputes SiLU(gate) in
  backward), plus the adapter inputs no other op keeps, both norm outputs and the SwiGLU product
  (``2d + f`` at ``c``) unless, without dropout, a cast to the adapter dtype replaces them (its copy at ``l``
  when ``l != c``) or, without checkpointing, ``train.rebuild`` rebuilds them (or the 2-D views of them that
  the A matmul keeps without dropout) in backward (the norm outputs with the fused RMSNorm); ``r`` at ``l``
  per adapter; with dropout a keep mask of 1 bit a value per input (one per shared-input group with
  ``fuse_lora``; ``lora.dropout``, which keeps the input uncast and packs the mask 8 values to a byte). Without
  checkpointing: ``L`` blocks. With it: ``L B T d c`` (each block's input) plus one block being recomputed
  (attention scores are not stored: SDPA);
- ``logits``            the trainer's chunked head + cross-entropy (``train.loss``, chunk ``C`` rows):
  ``CHUNK_FP32_COPIES * min(C, B T) V * 4 + 2 B T d c`` (the logits of one chunk and a same-sized
  temporary, the target rows and their gradient); with ``loss_chunk = 0`` the full-logits reference,
  ``LOGITS_FP32_COPIES * B T V * 4``. Every token is assumed to be a target (the worst case);
- ``backward_workspace`` one decoder block's backward temporaries, ``BLOCK_BACKWARD_MLP_COPIES B T f c`` (the
  SwiGLU backward's), beyond ``logits``: the loss's transients are freed before backward, so the step holds the
  larger of the two (nonzero only for long sequences);
- ``dequant_workspace`` one dequantize of the largest weight: on a GPU without the fused Triton path the
  torch decode's int32 byte indices (2 bytes/value), the gathered int64 pairs (4), the fp32 product (4) and
  its cast to ``c`` (when ``c`` is not fp32); on the CPU the compiled decode writes straight into one
  per-thread buffer that lives as long as the process (``quant.linear.dequantize_scratch``): ``c`` bytes/value;
- CPU only: ``checkpoint_save``: saving a checkpoint reads the paged state back and safetensors serializes
  every tensor into a bytes buffer, ``S = 2 (optimizer state, paged part included) + 2 lora_params`` (on a
  GPU both copies are in host memory). The trainer saves after ``optimizer.step`` and
  ``zero_grad(set_to_none=True)``, when the step's transients (``lora_grads``, ``activations``, ``logits``)
  are freed, so the peak is ``max(step, save)`` and the row is only the excess
  ``max(0, S - those four)``; the parts still sum to the peak. ``framework`` (``CPU_FRAMEWORK_BYTES``,
  measured). Then the glibc heap: with a fixed mmap threshold (the trainer's default), ``small_block_heap``
  when one ``(B, T, d)`` block at ``c`` is smaller than the threshold, so the block's activations come from
  the heap, which grows during the first step and keeps the freed blocks resident:
  ``CPU_SMALL_BLOCK_HEAP_ROWS * L * B T d c`` (measured on a shape that is not a benchmark case); with
  glibc's dynamic threshold (``mmap_threshold_kib = 0``) ``heap_retention`` instead
  (``CPU_HEAP_RETENTION_PER_QPARAM`` per quantized value, calibrated; the same with ``malloc_trim`` after
  each step, which returns pages between steps but did not lower the peak, docs/memory.md), or, when larger
  (no checkpointing: the saved activations dominate), ``CPU_HEAP_GROWTH_PER_LOG2_MICRO * log2(M) *
  activations`` for ``M`` micro-batches per step: freed activation blocks of varying packed-row lengths
  fragment the heap, which grows with every micro-batch (measured, not a law), plus, without checkpointing,
  one forward's holes ``CPU_DYNAMIC_HEAP_ROWS * L * B T d c`` (``CPU_DYNAMIC_TRIMMED_HEAP_ROWS`` with
  ``malloc_trim_blocks``); see ``planner.constants``. With qlorakit's caching arena (``arena``) none of
  these: glibc keeps only blocks under ``train.arena.MIN_BYTES`` (``glibc_heap`` = ``CPU_ARENA_HEAP_BYTES``,
  measured), and ``arena_slack`` = ``CPU_ARENA_SLACK_FRACTION`` x the step's transients counts what the
  arena's best fit cannot place.

Full fine-tuning (``full_finetune``, ``train.finetune: full``; the base unquantized) trains every weight:
there are no adapters (``lora_params`` = ``lora_grads`` = 0, no adapter terms in the activations),
``base_weights`` and ``embeddings`` are the trained weights, and

- ``full_grads``        one gradient per trained value, in its dtype (``c``; norms 4 bytes);
- ``optimizer_state``   AdamW over every trained tensor (the linears ``(out, in)``, the embedding and an untied
  head ``(V, d)``, the norms as ``(d,)`` vectors, other parameters as one vector): 8 bytes per value in 32 bits;
- ``head_grad``         with the chunked loss, its fp32 ``(V, d)`` accumulator of the head's gradient;
- ``checkpoint_save``   ``S`` = the optimizer state once (paged part included; measured on SmolLM2 with paged
  AdamW: 979 MiB over the RSS before the save for 1,026 MiB of state), not ``2 state + 2 weights``.

The CUDA context and the caching allocator's fragmentation are not modelled on the GPU (not measured here).
On the CPU, ``benchmarks/plan_accuracy.py`` (256 tokens, r 16, paged AdamW, 1 MiB threshold; docs/memory.md)
measured peak RSS 1,090 / 1,051 / 1,433 MiB for SmolLM2-135M / llama-350m / llama-700m, predicted 1,221 /
1,066 / 1,468 (1.12 / 1.01 / 1.02).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qlorakit.config import COMPUTE_DTYPES, MemoryConfig, QuantConfig, checkpointed_blocks
from qlorakit.constants import LOSS_CHUNK_TOKENS, OPTIMIZER_NAMES, TRAIN_METHODS
from qlorakit.errors import ConfigError
from qlorakit.lora.fused import SHARED_INPUT_GROUPS
from qlorakit.planner.constants import (
    BLOCK_BACKWARD_MLP_COPIES,
    CHUNK_FP32_COPIES,
    CPU_ARENA_HEAP_BYTES,
    CPU_ARENA_SLACK_FRACTION,
    CPU_DYNAMIC_HEAP_ROWS,
    CPU_DYNAMIC_TRIMMED_HEAP_ROWS,
    CPU_FRAMEWORK_BYTES,
    CPU_HEAP_GROWTH_PER_LOG2_MICRO,
    CPU_HEAP_RETENTION_PER_QPARAM,
    CPU_SMALL_BLOCK_HEAP_ROWS,
    LOGITS_FP32_COPIES,
)
from qlorakit.planner.shapes import LinearShape, ModelShape
from qlorakit.quant.tensor import NESTED_BLOCKSIZE

DEVICES = ("gpu", "cpu")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CODE_TABLE_BYTES = 16 * 4  # the 4-bit code table of each weight (fp32)
NESTED_TABLE_BYTES = 256 * 4 + 4  # the 8-bit map of the absmax plus the fp32 offset


@dataclass(frozen=True)
class PlanSettings:
    """A training setup to plan for; invalid values fail naming the field."""

    seq_len: int = 512
    batch_size: int = 1
    lora_r: int = 64
    lora_dropout: float = 0.05
    lora_dora: bool = False  # DoRA: one magnitude value per output feature of each adapted linear
    optim: str = "paged_adamw"
    optim_budget_mib: int = 0  # resident MiB of paged state; 0 = twice the largest paged tensor's state
    gradient_checkpointing: bool = True
    checkpoint_blocks: int = 0  # with checkpointing: the first this many decoder blocks recompute (0 = all)
    device: str = "gpu"
    compute_dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    lora_dtype: str = "float32"  # qlorakit keeps adapters in fp32; the paper's script used bf16
    loss_chunk: int = LOSS_CHUNK_TOKENS  # rows of logits at once (the trainer's default); 0 = full logits
    mmap_threshold_kib: int = MemoryConfig().malloc_mmap_threshold_kib  # the trainer's; 0 = glibc's dynamic one
    malloc_trim: bool = MemoryConfig().malloc_trim  # the trainer's: free heap pages returned after each step
    recompute_swiglu: bool = MemoryConfig().recompute_swiglu  # the trainer's: SiLU(gate) is not kept for backward
    fuse_lora: bool = MemoryConfig().fuse_lora  # the trainer's: q/k/v and gate/up share one input copy and mask
    rebuild_adapter_inputs: bool = MemoryConfig().rebuild_adapter_inputs  # the trainer's (train.rebuild)
    fuse_rmsnorm: bool = MemoryConfig().fuse_rmsnorm  # the trainer's: norms keep their input as it came (train.rmsnorm)
    malloc_trim_blocks: bool = MemoryConfig().malloc_trim_blocks  # the trainer's: malloc_trim at each block's forward
    arena: bool = MemoryConfig().arena  # qlorakit's caching arena serves the CPU tensors (train.arena)
    quant: QuantConfig = field(default_factory=QuantConfig)
    grad_accum: int = 1  # micro-batches per optimizer step (the dynamic-threshold heap grows with each one)
    method: str = "sft"  # dpo / orpo: each example is a pair, chosen + rejected in one batch of 2 x batch_size rows
    full_finetune: bool = False  # every weight trains (train.finetune: full): no adapters; needs quant none

    def __post_init__(self) -> None:
        if self.full_finetune and self.quant.quantized:
            raise ConfigError(f"PlanSettings.full_finetune needs an unquantized base (quant_type none), not "
                              f"{self.quant.quant_type!r}: 4-bit weights are frozen")
        if self.method not in TRAIN_METHODS:
            raise ConfigError(f"PlanSettings.method = {self.method!r}: choose one of {TRAIN_METHODS}")
        for name in ("seq_len", "batch_size", "lora_r", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PlanSettings.{name} = {value!r}: must be an integer >= 1")
        for name in ("optim_budget_mib", "loss_chunk", "mmap_threshold_kib", "checkpoint_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"PlanSettings.{name} = {value!r}: must be an integer >= 0")
        if self.optim not in OPTIMIZER_NAMES:
            raise ConfigError(f"unknown optimizer {self.optim!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
        if self.optim_budget_mib and not self.optim.startswith("paged_"):
            raise ConfigError(f"an optimizer budget applies to paged optimizers; optim is {self.optim!r} "
                              f"(use paged_{self.optim} or drop the budget)")
        if self.device not in DEVICES:
            raise ConfigError(f"PlanSettings.device = {self.device!r}: choose one of {DEVICES}")
        if self.compute_dtype not in ("auto",) + COMPUTE_DTYPES or self.lora_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"PlanSettings compute_dtype/lora_dtype = {self.compute_dtype!r}/{self.lora_dtype!r}: "
                              f"choose from {COMPUTE_DTYPES} (compute_dtype may also be auto)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"PlanSettings.lora_dropout = {self.lora_dropout!r}: must be in [0, 1)")

    @property
    def rows(self) -> int:
        """Sequences in one micro-batch: ``batch_size``, twice that for DPO / ORPO pairs (``data.pairs``)."""
        return self.batch_size * (1 if self.method == "sft" else 2)

    @property
    def compute(self) -> str:
        if self.compute_dtype != "auto":
            return self.compute_dtype
        return "bfloat16" if self.device == "gpu" else "float32"


@dataclass(frozen=True)
class Part:
    name: str
    nbytes: int
    note: str


@dataclass(frozen=True)
class MemoryPlan:
    """The breakdown: ``parts`` sum to ``total_bytes``; ``alternatives`` are the same parts with a switch flipped."""

    model: str
    settings: PlanSettings
    parts: tuple[Part, ...]
    offloaded_bytes: int  # paged optimizer state kept outside the device (host RAM on a GPU, a file on the CPU)
    alternatives: dict[str, int]
    budget_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def part(self, name: str) -> int:
        return next(p.nbytes for p in self.parts if p.name == name)

    def as_dict(self) -> dict[str, Any]:
        """One JSON object: ``<part>_bytes`` per row and ``total_bytes`` (the only ``*_bytes`` keys), plus context."""
        out: dict[str, Any] = {"model": self.model, "settings": asdict(self.settings)}
        out.update({f"{p.name}_bytes": p.nbytes for p in self.parts})
        out["total_bytes"] = self.total_bytes
        out["fits"] = self.fits
        out["budget"] = self.budget_bytes  # bytes, or null without --gpu-mem
        out["paged_out"] = self.offloaded_bytes  # bytes of paged optimizer state outside the device
        out["alternatives"] = dict(self.alternatives)  # bytes of parts with a switch flipped
        return out


def plan(shape: ModelShape, settings: PlanSettings, budget_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of training ``shape`` with ``settings`` (see the module docstring for each part)."""
    s, c, lb = settings, DTYPE_BYTES[settings.compute], DTYPE_BYTES[settings.lora_dtype]
    if s.full_finetune:  # no adapters: every LoRA term below is zero
        shape = dataclasses.replace(shape, linears=tuple(dataclasses.replace(lin, adapted=False)
                                                         for lin in shape.linears))
    targets = [lin for lin in shape.linears if lin.quantized]  # the base linears stored in 4 bits (or not)
    quantized = targets if s.quant.quantized else []
    adapted = [lin for lin in shape.linears if lin.adapted]
    lora_values = sum(math.prod(shape) for lin in adapted for shape in adapter_shapes(lin, s))
    trained = full_tensors(shape) if s.full_finetune else [
        (lin.path, sh) for lin in adapted for sh in adapter_shapes(lin, s)]
    resident_optim, offloaded = optimizer_bytes(trained, s)
    act_ckpt, act_full = activation_bytes(shape, s, shape.num_layers), activation_bytes(shape, s, 0)
    checkpointed = checkpointed_blocks(s.gradient_checkpointing, s.checkpoint_blocks, shape.num_layers)
    act = activation_bytes(shape, s, checkpointed)
    n_max = max((lin.numel for lin in quantized), default=0)
    parts = [
        Part("weights_4bit", sum(-(-lin.numel // 2) for lin in quantized), "packed 4-bit codes, two per byte")
        if s.quant.quantized else
        Part("base_weights", sum(lin.numel for lin in targets) * c,
             f"{'trained' if s.full_finetune else 'frozen'} base linears unquantized, {s.compute}"),
        Part("quant_constants", quant_constant_bytes(quantized, s.quant), _dq_note(s.quant)),
        Part("embeddings", (shape.embedding_params + shape.other_params) * c,
             f"embeddings, lm_head{' (tied)' if shape.tied_embeddings else ''}, biases in {s.compute}"),
        Part("norms", shape.norm_params * 4, "normalization weights, fp32"),
        Part("lora_params", lora_values * lb, f"{lora_values:,} adapter values (r {s.lora_r}"
             f"{', DoRA magnitudes' if s.lora_dora else ''}) in {s.lora_dtype}"),
        Part("lora_grads", lora_values * lb, "their gradients"),
        Part("optimizer_state", resident_optim, _optim_note(s, offloaded)),
        Part("activations", act, "saved for backward, " + _checkpointing_note(checkpointed, shape.num_layers)),
        Part("logits", logits_bytes(shape, s), _logits_note(s)),
        Part("backward_workspace", max(0, block_backward_bytes(shape, s) - logits_bytes(shape, s)),
             "one block's backward temporaries beyond the loss's (they come after the loss's are freed)"),
        Part("dequant_workspace", dequant_workspace_bytes(n_max, c, s.device), "one dequantize of the largest weight"),
    ]  # fmt: skip
    if s.lora_dora:  # the norm ||W + s B A||_row: the fp32 dequantized W and the sum, one layer at a time
        parts.append(Part("dora_norm_workspace", 2 * n_max * 4, "fp32 W and W + s B A of the largest weight (DoRA)"))
    trained_bytes = lora_values * lb
    if s.full_finetune:
        trained_bytes = full_weight_bytes(shape, c)
        parts.append(Part("full_grads", trained_bytes, "gradients of every trained weight (full fine-tuning)"))
        parts.append(Part("head_grad", shape.vocab_size * shape.hidden_size * 4 if s.loss_chunk else 0,
                          "the chunked loss's fp32 accumulator of the head's gradient" if s.loss_chunk
                          else "none: full logits (autograd's head gradient is in full_grads)"))
    if s.device == "cpu":
        parts += cpu_parts(shape, s, parts, resident_optim + offloaded, trained_bytes, quantized)
    alternatives = {
        "quant_constants_with_double_quant": quant_constant_bytes(quantized, _with_dq(s.quant, True)),
        "quant_constants_without_double_quant": quant_constant_bytes(quantized, _with_dq(s.quant, False)),
        "activations_with_checkpointing": act_ckpt,
        "activations_without_checkpointing": act_full,
        "lora_inputs_without_checkpointing": shape.num_layers * lora_input_bytes_per_layer(shape, s),
    }
    return MemoryPlan(shape.name, s, tuple(parts), offloaded, alternatives, budget_bytes)


#: Parts the trainer frees before it saves a checkpoint (after the optimizer step, gradients set to None).
STEP_TRANSIENTS = ("lora_grads", "activations", "logits", "full_grads", "head_grad")  # freed before a save


def full_tensors(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors full fine-tuning trains, as (label, shape): the linears, the embedding (and an untied head),
    the norms as ``(d,)`` vectors and the other parameters as one vector (their split is not known here)."""
    d = shape.hidden_size
    out: list[tuple[str, tuple[int, ...]]] = [(lin.path, (lin.out_features, lin.in_features))
                                              for lin in shape.linears if lin.quantized]
    heads = 1 if shape.tied_embeddings else 2
    out += [("embed_tokens" if i == 0 else "lm_head", (shape.vocab_size, d)) for i in range(heads)]
    rest = shape.embedding_params - heads * shape.vocab_size * d
    out += [("norms", (d,))] * (shape.norm_params // d)
    leftover = [n for n in (rest, shape.norm_params % d, shape.other_params) if n > 0]
    return out + [("other", (n,)) for n in leftover]


def full_weight_bytes(shape: ModelShape, c: int) -> int:
    """Bytes of every trained weight (and so of their gradients): linears and embeddings at ``c``, norms fp32."""
    linears = sum(lin.numel for lin in shape.linears if lin.quantized)
    return (linears + shape.embedding_params + shape.other_params) * c + shape.norm_params * 4


def dequant_workspace_bytes(n_max: int, c: int, device: str) -> int:
    """One dequantize of the largest weight (``n_max`` values), see the module docstring."""
    if device == "cpu":  # the compiled decode writes into one reused (out, in) buffer in the compute dtype
        return n_max * c
    return n_max * (2 + 4 + 4 + (0 if c == 4 else c))


def cpu_parts(shape: ModelShape, s: PlanSettings, parts: list[Part], optim_total: int, trained_bytes: int,
              quantized: list[LinearShape]) -> list[Part]:
    """The CPU rows: checkpoint save beyond the step's transients, framework, glibc heap (module docstring)."""
    # LoRA: the adapters and their state, read back and serialized (2x, measured); full fine-tuning: the state
    # once (measured on SmolLM2 with paged AdamW: 979 MiB over the RSS before the save, the state is 1,026 MiB;
    # the weights and the resident state are serialized without a whole copy)
    saved = optim_total if s.full_finetune else 2 * optim_total + 2 * trained_bytes
    transients = sum(p.nbytes for p in parts if p.name in STEP_TRANSIENTS)
    out = [Part("checkpoint_save", max(0, saved - transients),
                f"saving reads back and serializes {saved / 2**20:,.1f} MiB after the step's transients are freed "
                "(only the excess counts)"),
           Part("framework", CPU_FRAMEWORK_BYTES, "Python, torch, transformers, loader (measured)")]  # fmt: skip
    if s.arena:
        out.append(Part("arena_slack", int(CPU_ARENA_SLACK_FRACTION * transients),
                        "caching arena: what best fit cannot place, of the step's transients (measured)"))
        out.append(Part("glibc_heap", CPU_ARENA_HEAP_BYTES, "glibc's heap of small blocks beside the arena (measured)"))
        return out
    if s.mmap_threshold_kib == 0:
        retention = int(CPU_HEAP_RETENTION_PER_QPARAM * sum(lin.numel for lin in quantized))
        activations = next(p.nbytes for p in parts if p.name == "activations")
        growth = CPU_HEAP_GROWTH_PER_LOG2_MICRO * math.log2(s.grad_accum) * activations
        if not s.gradient_checkpointing:  # one forward's holes between the kept tensors, per (B, T, d) block
            rows = CPU_DYNAMIC_TRIMMED_HEAP_ROWS if s.malloc_trim_blocks else CPU_DYNAMIC_HEAP_ROWS
            growth += rows * shape.num_layers * s.rows * s.seq_len * shape.hidden_size * DTYPE_BYTES[s.compute]
        retention = max(retention, int(growth))  # the growth term wins without checkpointing (big activations)
        trimmed = " (malloc_trim after each step does not lower the peak: measured)" if s.malloc_trim else ""
        trimmed += ", trimmed before each block's forward" if s.malloc_trim_blocks else ""
        out.append(Part("heap_retention", retention,
                        f"glibc heap kept with a dynamic mmap threshold (calibrated){trimmed}"))
        return out
    row = s.rows * s.seq_len * shape.hidden_size * DTYPE_BYTES[s.compute]  # one (B, T, d) block
    if row < s.mmap_threshold_kib * 1024:
        out.append(Part("small_block_heap", int(CPU_SMALL_BLOCK_HEAP_ROWS * shape.num_layers * row),
                        f"glibc heap kept after step 1: (B, T, d) blocks of {row / 1024:,.0f} KiB are under the "
                        f"{s.mmap_threshold_kib} KiB mmap threshold (measured)"))
    return out


def _with_dq(quant: QuantConfig, double_quant: bool) -> QuantConfig:
    return QuantConfig(quant_type=quant.quant_type, blocksize=quant.blocksize, double_quant=double_quant)


def _dq_note(quant: QuantConfig) -> str:
    if not quant.quantized:
        return "none: the base is not quantized"
    kind = "uint8 absmax + fp32 nested absmax (double quant)" if quant.double_quant else "fp32 absmax (no double quant)"
    return f"{quant.quant_type.upper()} block {quant.blocksize}: {kind}"


def _logits_note(s: PlanSettings) -> str:
    if s.loss_chunk:
        return f"chunked head + cross-entropy, {s.loss_chunk} rows at a time"
    return f"full logits: {LOGITS_FP32_COPIES} fp32 copies of batch x tokens x vocab"


def _optim_note(s: PlanSettings, offloaded: int) -> str:
    if s.optim.startswith("paged_"):
        return f"{s.optim}: resident budget; {offloaded / 2**20:,.1f} MiB paged out to host"
    return f"{s.optim}: all state resident"


def quant_constant_bytes(quantized: list[LinearShape], quant: QuantConfig) -> int:
    """Scales and code tables of every quantized weight (see the module docstring)."""
    total = 0
    for lin in quantized:
        blocks = -(-lin.numel // quant.blocksize)
        if quant.double_quant:
            total += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + NESTED_TABLE_BYTES
        else:
            total += 4 * blocks
        total += CODE_TABLE_BYTES
    return total


def adapter_shapes(lin: LinearShape, s: PlanSettings) -> tuple[tuple[int, ...], ...]:
    """The trained tensors on one adapted linear: ``A (r, in)``, ``B (out, r)`` and, with DoRA, ``m (out,)``."""
    shapes: tuple[tuple[int, ...], ...] = ((s.lora_r, lin.in_features), (lin.out_features, s.lora_r))
    return shapes + ((lin.out_features,),) if s.lora_dora else shapes


def optimizer_bytes(trained: list[tuple[str, tuple[int, ...]]], s: PlanSettings) -> tuple[int, int]:
    """(resident, offloaded) bytes of AdamW state for the ``trained`` (label, shape) tensors: the adapters
    ``A (r, in)``, ``B (out, r)`` (and DoRA's ``m``), or every weight with full fine-tuning."""
    from qlorakit.optim.adamw import PAGE_MIN_SIZE, AdamW
    from qlorakit.optim.paged import pack_block
    from qlorakit.optim.paging_backends import FileBackend, PinnedBackend
    from qlorakit.optim.state8bit import layout_8bit

    min_8bit = inspect.signature(AdamW).parameters["min_8bit_size"].default
    granularity = (FileBackend if s.device == "cpu" else PinnedBackend).granularity
    resident, paged = 0, []
    for label, shape in trained:
        numel = math.prod(shape)
        if s.optim.endswith("8bit") and numel >= min_8bit:
            layout = layout_8bit(torch.Size(shape))
        else:
            layout = {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        if s.optim.startswith("paged_") and numel >= PAGE_MIN_SIZE:
            paged.append((pack_block(layout, granularity).nbytes, f"{label} {shape}"))
        else:
            resident += sum(torch.Size(sh).numel() * dt.itemsize for sh, dt in layout.values())
    if not paged:
        return resident, 0
    largest, where = max(paged)
    budget = s.optim_budget_mib * 2**20 if s.optim_budget_mib else 2 * largest
    if budget < largest:
        raise ConfigError(
            f"optimizer budget {s.optim_budget_mib} MiB cannot hold the state of one adapter tensor "
            f"({where}: {largest:,} bytes); raise the budget to at least {-(-largest // 2**20)} MiB or lower r"
        )
    total = sum(nbytes for nbytes, _ in paged)
    held = min(total, budget)
    return resident + held, total - held


def lora_input_bytes_per_layer(shape: ModelShape, s: PlanSettings) -> int:
    """Adapter inputs one block keeps for backward (each adapter's own copy) and the ``r``-wide middles."""
    lb = DTYPE_BYTES[s.lora_dtype]
    adapted = [lin for lin in shape.linears if lin.adapted and lin.quantized]
    tokens = s.rows * s.seq_len
    return tokens * sum((lin.in_features + s.lora_r) * lb for lin in adapted) // max(1, shape.num_layers)


def _checkpointing_note(checkpointed: int, num_layers: int) -> str:
    if checkpointed == 0:
        return "no checkpointing"
    return "checkpointing on" if checkpointed == num_layers else f"checkpointing {checkpointed} of {num_layers} blocks"


def activation_bytes(shape: ModelShape, s: PlanSettings, checkpointed: int) -> int:
    """Tensors saved for backward (see the module docstring) when the first ``checkpointed`` decoder blocks
    recompute in backward (0: no checkpointing; ``num_layers``: every block)."""
    c, L = DTYPE_BYTES[s.compute], shape.num_layers
    rope = 2 * s.seq_len * shape.head_dim * c  # the cos / sin tables every block's RoPE keeps
    if checkpointed <= 0:
        return L * _block_bytes(shape, s, rebuilt_here=True) + rope
    # each recomputing block keeps its input. The first ``checkpointed`` blocks recompute, so backward reaches
    # them after the later blocks' activations are freed: the peak is the larger of the end of the forward and
    # one block's recompute
    checkpointed = min(checkpointed, L)
    inputs = checkpointed * s.rows * s.seq_len * shape.hidden_size * c
    kept = (L - checkpointed) * _block_bytes(shape, s, True)
    return inputs + max(kept, _block_bytes(shape, s, False)) + rope


def _block_bytes(shape: ModelShape, s: PlanSettings, rebuilt_here: bool) -> int:
    """What one decoder block keeps for backward; ``rebuilt_here``: ``train.rebuild`` runs in it (a block that
    checkpointing recomputes packs its tensors with checkpoint's own hooks instead)."""
    c, lb = DTYPE_BYTES[s.compute], DTYPE_BYTES[s.lora_dtype]
    tokens = s.rows * s.seq_len
    d, k, f = shape.hidden_size, shape.kv_size, shape.intermediate_size
    mlp = 2 if s.recompute_swiglu else 3  # gate, up (+ SiLU(gate) without the recompute)
    # layer input and residual (the norms keep them: the fused RMSNorm as they came, the module of a 16-bit model
    # its fp32 upcast), q, k, v after RoPE, the attention output (SDPA keeps it; it is o_proj's adapter input
    # too), the MLP's; + SDPA's logsumexp and the norms' scales
    norm_in = c if s.fuse_rmsnorm else 4
    block = tokens * (2 * d * norm_in + (2 * d + 2 * k + mlp * f) * c + (shape.num_heads + 2) * 4)
    per_layer_adapters = [lin for lin in shape.linears if lin.adapted and lin.quantized]
    dropout, cast = s.lora_dropout > 0, lb != c
    # the adapter inputs no other op keeps: both norm outputs and the SwiGLU product (2d + f at c). Without dropout
    # a cast to the adapter dtype replaces them (the matmul keeps the cast copy, at l); with dropout the lean path
    # keeps the input as it came (at c) and casts inside (lora.dropout), and without checkpointing train.rebuild
    # rebuilds them in backward instead: the norm outputs with the fused RMSNorm (which offers them), the product
    # with recompute_swiglu
    keeps_cast = cast and not dropout
    rebuilt = s.rebuild_adapter_inputs and rebuilt_here and not keeps_cast  # the input itself or a view of it
    if per_layer_adapters and not keeps_cast:
        norm_outputs = 0 if rebuilt and s.fuse_rmsnorm else 2 * d
        block += tokens * (norm_outputs + (0 if rebuilt and s.recompute_swiglu else f)) * c
    adapters = sum(s.lora_r * lb for lin in per_layer_adapters)  # the r-wide middles u
    # per input (or shared-input group): the cast copy at l without dropout, the keep mask (1 bit a value) with it
    widths = input_copies(per_layer_adapters, s.fuse_lora)
    adapters += int(keeps_cast) * sum(widths) * lb + int(dropout) * sum(widths) // 8
    block += tokens * adapters // max(1, shape.num_layers)
    if s.fuse_lora:  # each fused group's stacked [A_1; ...; A_k] (the product's weight), per block
        block += (sum(lin.in_features * s.lora_r for lin in per_layer_adapters)
                  - sum(lin.in_features * s.lora_r for lin in per_layer_adapters
                        if _group_of(lin) is None)) * lb // max(1, shape.num_layers)  # fmt: skip
    return block


def _group_of(lin: LinearShape) -> int | None:
    child = lin.path.rpartition(".")[2]
    return next((g for g, names in enumerate(SHARED_INPUT_GROUPS) if child in names), None)


def input_copies(adapted: list[LinearShape], fused: bool) -> list[int]:
    """The widths of the adapter-input copies (cast and/or dropped) that backward keeps: one per adapter, or,
    with shared-input fusion, one per group of ``lora.fused.SHARED_INPUT_GROUPS`` siblings (one cast, one mask)."""
    groups: dict[tuple[str, int], int] = {}
    for i, lin in enumerate(adapted):
        parent, _, child = lin.path.rpartition(".")
        group = next((g for g, names in enumerate(SHARED_INPUT_GROUPS) if child in names), None)
        key = (parent, group) if fused and group is not None else (lin.path, -1 - i)
        groups[key] = lin.in_features
    return list(groups.values())


def block_backward_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """The largest temporaries of one decoder block's backward: ``BLOCK_BACKWARD_MLP_COPIES (B, T, f)`` tensors."""
    return BLOCK_BACKWARD_MLP_COPIES * s.rows * s.seq_len * shape.intermediate_size * DTYPE_BYTES[s.compute]


def logits_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """The loss: one chunk of fp32 logits (+ temporary) and the target rows with their gradient, or full logits."""
    tokens = s.rows * s.seq_len
    if s.loss_chunk == 0:
        return LOGITS_FP32_COPIES * tokens * shape.vocab_size * 4
    rows = 2 * tokens * shape.hidden_size * DTYPE_BYTES[s.compute]
    return CHUNK_FP32_COPIES * min(s.loss_chunk, tokens) * shape.vocab_size * 4 + rows
