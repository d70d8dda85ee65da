"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with the 4-bit base sharded (``--distributed fsdp``).

The 4-bit storage FSDP shards. ``Linear4bit`` keeps its weight as a ``QuantizedTensor`` (a plain attribute, which
``fully_shard`` cannot see). ``shard_quantized_storage`` turns each such layer into a ``ShardedLinear4bit``
(the same class with one property changed: ``qweight`` is rebuilt from registered parameters; the forward,
the GEMV branch and the autograd function are ``Linear4bit``'s own) holding two frozen **integer**
``nn.Parameter``s that FSDP2 shards along dim 0:

- ``packed_rows``: uint8 ``(P, blocksize // 2)``, one row per quantization block (the bitsandbytes codes, two
  per byte, in their flat order; the last block's missing bytes and the padding rows are zero);
- ``absmax_rows``: ``(P,)``, the uint8 absmax codes (double quantization) or the fp32 absmax carried as its
  int32 bit pattern (``Tensor.view(torch.int32)``; never a float view of integer data, and no float cast can
  reach it: FSDP2's mixed precision casts floating parameters only).

The shard rule. ``P`` is the block count rounded up to a multiple of ``N * U`` blocks, ``U = 256`` (a
double-quantization group, ``NESTED_BLOCKSIZE``) with double quantization and ``U = 1`` without. FSDP2
gives rank ``r`` rows ``[r P/N, (r+1) P/N)``: a whole number of 64-element quantization blocks and of
256-block double-quantization groups, so a rank's shard is a self-contained piece of the bitsandbytes state
(its codes, their absmax codes, and the ``nested.absmax`` entries of those groups). Every shape can be
sharded; the price is the padding, at most ``N * U - 1`` zero blocks per layer (``padding_bytes``): for
SmolLM2-135M on 2 ranks with double quantization 2.8 % of the packed bytes (tested). The small tables (``code``,
``nested.code``, ``nested.absmax``: ``numel / 16384`` floats) stay replicated on every rank.

During a block's forward and backward FSDP2 all-gathers the rows (uint8 stays uint8: its all-gather copies
mixed dtypes as bytes, and it skips mixed precision for non-float parameters), and ``qweight`` views the
gathered rows as the original ``QuantizedTensor`` (``packed = rows.flatten()[:bytes].view(-1, 1)``, no copy):
bit for bit the unsharded weight (tested). Outside a forward the parameters are sharded DTensors and
``qweight`` is refused with a clear error.

A layer loaded sharded (``--fsdp-load stream|broadcast``, ``parallel.fsdp_load``) arrives as a ``ShardedLinear4bit``
holding only this rank's rows (``rows_of(q, N, r)``: bit for bit ``torch.chunk`` of the padded rows);
``fully_shard_model`` hands them to FSDP2 as the local shards, so the whole base never exists on one rank.

The trainer's side (``FsdpRun``): ``fully_shard`` on every decoder block and then on the root with an explicit
``MixedPrecisionPolicy``; the LoRA parameters become sharded DTensors. The global token-mean loss stays
exact: each rank backpropagates ``CE_sum / N_tok`` (``parallel.replicas``), gradients are **summed**
(``set_gradient_divide_factor(1.0)``) and reduce-scattered once per step, after the last micro-batch
(``set_requires_gradient_sync(False)`` before the others). The optimizer (any of ``optim.make_optimizer``'s)
runs on the local shards (``to_local()``, the same storage), and the clipping norm is the global one: the
squared local norms are all-reduced. A loss that calls the decoder and the head apart (the chunked head) runs
as a forward of the root (``FsdpRun.root_forward``). Checkpoints are consolidated: rank 0 writes the adapter whole (PEFT
layout) and the optimizer state as full tensors, exactly the one-process format, so a resume works from or to
any world size and from or to DDP.

8-bit optimizer state on shards (the 8-bit rule). The 8-bit AdamW state (``optim.state8bit``) is blockwise:
one absmax per ``B = 256`` consecutive elements of the flattened parameter. FSDP2 cuts dim 0 as ``torch.chunk``
does: with ``c = ceil(rows / N)`` rank ``r`` holds rows ``[r c, min((r+1) c, rows))``, i.e. the flat elements
``[r c k, ...)``, ``k = numel / rows`` (the last ranks hold fewer rows, or none). So a rank's own blocks are
exactly blocks of the one-process state when

    c * k  is a multiple of B      (or c >= rows: rank 0 holds the whole parameter)

and then the rank's 8-bit update of its shard is, block for block, the one-process update of those elements
(the absmax of a block and the rounding of its elements depend on that block alone). Which parameters keep
8-bit state at all follows the whole parameter's size, as in one process (``AdamW(whole_numels=...)``).
Consolidation gathers each rank's uint8 codes along dim 0 and concatenates the ranks' absmax in rank order:
the one-process state tensors. A parameter that keeps 8-bit state and breaks the rule is not sharded: FSDP
leaves it alone (``ignored_params``), it is whole on every rank, its gradient is all-reduced as under DDP and
every rank updates it with the one-process 8-bit state (``FsdpRun.whole_params`` names them; the trainer prints
them). ``lora_A`` (``r x d``) satisfies
the rule whenever ``d`` is a multiple of 256, ``lora_B`` (``d x r``) whenever ``ceil(d / N) * r`` is (Llama
shapes with an even ``r`` on up to 8 ranks do); SmolLM2-135M's ``lora_A`` (``r x 576``) with ``r = 8`` on 4
ranks does not (2 rows of 576 = 1152 elements per shard).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qlorakit.errors import ConfigError
from qlorakit.optim.state8bit import STATE_BLOCKSIZE, num_blocks
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.tensor import NESTED_BLOCKSIZE, QuantizedTensor


def shard_unit_blocks(qweight: QuantizedTensor) -> int:
    """Blocks that a shard boundary must not split: a double-quantization group (256), or one block."""
    return NESTED_BLOCKSIZE if qweight.double_quant else 1


def padded_blocks(qweight: QuantizedTensor, world: int) -> int:
    """The block count rounded up to a multiple of ``world * shard_unit_blocks``."""
    step = world * shard_unit_blocks(qweight)
    return -(-qweight.num_blocks // step) * step


class ShardedLinear4bit(Linear4bit):
    """``Linear4bit`` whose 4-bit state lives in integer parameters FSDP2 can shard (see the module docstring)."""

    packed_rows: nn.Parameter  # uint8 (P, blocksize // 2)
    absmax_rows: nn.Parameter  # uint8 (P,) with double quant, else int32 (P,) = the fp32 absmax's bits
    _template: QuantizedTensor  # the replicated tables and the metadata (shape, dtype, nested scales)

    _preshard: object | None = None  # loaded sharded (parallel.fsdp_load.Preshard): only this rank's rows, until
    #                                  fully_shard_model hands them to FSDP

    @property
    def device(self) -> torch.device:
        return self.packed_rows.device

    @property
    def qweight(self) -> QuantizedTensor:  # type: ignore[override]
        if self._preshard is not None:
            return self._preshard.whole(self)  # an all-gather inside parallel.fsdp_load.gathering(), else refused
        rows, absmax = self.packed_rows, self.absmax_rows
        if _is_dtensor(rows) or _is_dtensor(absmax):
            raise RuntimeError("ShardedLinear4bit: the 4-bit weight is sharded here; it is whole only inside the "
                               "FSDP forward/backward of its block (or under FsdpRun.unsharded())")
        return whole_weight(self._template, rows, absmax)

    @qweight.setter
    def qweight(self, value: QuantizedTensor) -> None:
        raise RuntimeError("ShardedLinear4bit: the weight cannot be replaced once sharded")

    def _apply(self, fn, recurse: bool = True):
        return nn.Module._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        nn.Module._load_from_state_dict(self, *args, **kwargs)  # the rows as parameters (a load's DTensor shards)

    def bind(self):
        return self  # the lean decoder's bound GEMV needs the whole weight: plain forward


def whole_weight(template: QuantizedTensor, rows: torch.Tensor, absmax: torch.Tensor) -> QuantizedTensor:
    """The ``QuantizedTensor`` that all ``P`` rows hold (views, no copy): ``template``'s tables and metadata."""
    packed = rows.reshape(-1)[: (template.numel + 1) // 2].view(-1, 1)  # (bytes, 1) uint8, a view of the rows
    flat = absmax.reshape(-1)[: template.num_blocks]
    return replace(template, packed=packed, absmax=flat if template.double_quant else flat.view(torch.float32))


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def rows_of(q: QuantizedTensor, world: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed_rows, absmax_rows)`` of ``q`` padded for ``world`` ranks: all ``P`` rows, or (``rank`` given)
    only that rank's ``P / world`` rows ``[rank P/world, (rank+1) P/world)``, built without the others.

    packed_rows: uint8 ``(rows, blocksize // 2)``; absmax_rows: uint8 ``(rows,)`` (double quant) or the fp32
    absmax's int32 bits ``(rows,)``. Bytes and blocks past the weight's end are zero.
    """
    total = padded_blocks(q, world)
    first, count = (0, total) if rank is None else (rank * total // world, total // world)
    width = q.blocksize // 2
    flat = q.packed.reshape(-1)  # (bytes,) uint8
    packed = torch.zeros(count * width, dtype=torch.uint8, device=q.device)  # (count * width,)
    mine = flat[first * width : (first + count) * width]
    packed[: mine.numel()] = mine
    absmax = q.absmax if q.double_quant else q.absmax.view(torch.int32)  # the fp32 bits, never a float view
    absmax_rows = torch.zeros(count, dtype=absmax.dtype, device=q.device)  # (count,)
    mine = absmax[first : first + count]
    absmax_rows[: mine.numel()] = mine
    return packed.view(count, width), absmax_rows


def become_sharded(layer: Linear4bit, q: QuantizedTensor, packed_rows: torch.Tensor,
                   absmax_rows: torch.Tensor) -> ShardedLinear4bit:
    """``layer`` (in place: the class changes) holding ``packed_rows`` / ``absmax_rows`` and ``q``'s tables."""
    layer.__dict__.pop("qweight", None)
    layer.__class__ = ShardedLinear4bit
    empty = torch.empty(0, dtype=torch.uint8, device=q.device)  # not views of the old storage: it is freed
    layer._template = replace(q, packed=empty, absmax=empty.to(q.absmax.dtype))  # tables + metadata only
    layer.packed_rows = nn.Parameter(packed_rows, requires_grad=False)  # (rows, blocksize // 2)
    layer.absmax_rows = nn.Parameter(absmax_rows, requires_grad=False)  # (rows,)
    return layer  # type: ignore[return-value]


def to_sharded_storage(layer: Linear4bit, world: int) -> ShardedLinear4bit:
    """Re-home ``layer``'s ``QuantizedTensor`` in padded integer rows (in place: the class changes)."""
    q = layer.qweight
    return become_sharded(layer, q, *rows_of(q, world))


def shard_quantized_storage(model: nn.Module, world: int) -> list[ShardedLinear4bit]:
    """Every ``Linear4bit`` of ``model`` turned into a ``ShardedLinear4bit`` for ``world`` ranks."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and not isinstance(m, ShardedLinear4bit)]
    return [to_sharded_storage(m, world) for m in layers]


def padding_bytes(layers: Sequence[ShardedLinear4bit]) -> tuple[int, int]:
    """(packed bytes stored with padding, packed bytes of the weights themselves) over ``layers``."""
    stored = sum(m.packed_rows.numel() if not _is_dtensor(m.packed_rows) else math.prod(m.packed_rows.shape)
                 for m in layers)
    return stored, sum((m._template.numel + 1) // 2 for m in layers)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules (HF causal LMs)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return list(module)
    raise ConfigError("--distributed fsdp: no list of decoder blocks found in the model (a ModuleList of "
                      "config.num_hidden_layers modules); use --distributed ddp")


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fully_shard_model(model: nn.Module, world: int, param_dtype: torch.dtype | None,
                      keep_whole: Sequence[nn.Parameter] = ()) -> list[nn.Module]:
    """The 4-bit storage re-homed, ``fully_shard`` per decoder block and on the root; the FSDP modules.

    ``param_dtype``: the mixed-precision policy's parameter and reduction dtype (the run's compute dtype;
    fp32 on CPU). Integer parameters are never cast (FSDP2 casts floating ones only). ``keep_whole``:
    parameters FSDP leaves alone (``ignored_params``): whole on every rank, their gradients summed by
    ``FsdpRun.grads_to_local`` (the 8-bit rule's fallback).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlorakit.parallel.fsdp_load import attach_preshards, detach_preshards

    device = next(model.parameters()).device
    shard_quantized_storage(model, world)
    preshards = detach_preshards(model, world)  # layers loaded sharded: full-shape meta rows for fully_shard
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype)
    ignored = set(keep_whole) or None
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=ignored)
    attach_preshards(preshards, mesh)  # ... and their own rows become the local shards (no copy)
    modules = fsdp_modules(model)
    for m in modules:
        m.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already divided by the global token count
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM; the factor is 1 anyway)
    return modules


@contextlib.contextmanager
def whole_model(model: nn.Module) -> Iterator[None]:
    """``model``'s FSDP modules all-gathered for the duration (a collective: every rank enters it); a model
    without FSDP modules: nothing. No forward may run inside (the blocks would reshard themselves after it)."""
    modules = fsdp_modules(model)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage); any other tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def shard_of(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s dim-0 piece of ``full`` as FSDP2 cuts it (``torch.chunk``; empty past the last chunk)."""
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        return chunks[rank].clone()
    return full.new_zeros((0, *full.shape[1:]))


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """(first row, row count) of rank ``rank``'s dim-0 piece of ``rows`` rows, as ``torch.chunk`` / FSDP2 cut it."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(chunk, rows - start)


def aligned_8bit(shape: Sequence[int], world: int) -> bool:
    """Whether every rank's shard of a parameter of ``shape`` is whole 8-bit state blocks (the module docstring)."""
    if len(shape) == 0 or shape[0] == 0:
        return True
    rows, inner = shape[0], math.prod(shape[1:])
    chunk = -(-rows // world)
    return chunk >= rows or chunk * inner % STATE_BLOCKSIZE == 0


def unaligned_8bit(shapes: Sequence[Sequence[int]], world: int, min_8bit_size: int) -> list[int]:
    """Indices of the parameters (whole ``shapes``) that keep 8-bit state and break the 8-bit rule on ``world``."""
    return [i for i, shape in enumerate(shapes)
            if math.prod(shape) >= min_8bit_size and not aligned_8bit(shape, world)]


def block_range(shape: Sequence[int], rank: int, world: int) -> tuple[int, int]:
    """(first block, block count) of rank ``rank``'s 8-bit state blocks within the whole parameter's."""
    start, count = shard_rows(shape[0], rank, world) if len(shape) else (0, 1)
    inner = math.prod(shape[1:])
    return start * inner // STATE_BLOCKSIZE, num_blocks(count * inner)


@dataclass
class FsdpRun:
    """A model sharded with ``fully_shard_model`` and its trainable parameters (DTensors) in optimizer order."""

    model: nn.Module
    modules: list[nn.Module]
    params: list[torch.Tensor]  # the sharded trainable parameters (DTensors), in the optimizer's order
    locals: list[torch.Tensor]  # their local shards (leaves sharing storage), what the optimizer updates
    world: int
    rank: int
    names: list[str]  # the parameters' names, in the optimizer's order

    def whole_params(self) -> list[str]:
        """The trainable parameters kept whole on every rank (not sharded: the 8-bit rule's fallback)."""
        return [n for n, p in zip(self.names, self.params, strict=True) if not _is_dtensor(p)]

    def root_forward(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(model, *args)`` run as a forward of the root FSDP module (torch's ``register_fsdp_forward_method``).

        For a function that calls into the model's submodules directly, as the chunked loss head does (the
        decoder, then the head on the target rows): the root's parameters (embeddings, final norm, head) are
        gathered before it, as for ``model(...)``, and the backward of its output gets the root's hooks.
        Returns a function of the same signature, for this ``model`` only.
        """
        from torch.distributed.fsdp import register_fsdp_forward_method

        name = f"_fsdp_root_{fn.__name__}"
        setattr(self.model, name, functools.partial(fn, self.model))  # an instance attribute of the root module
        register_fsdp_forward_method(self.model, name)  # now wrapped in the root's pre/post-forward hooks
        method = getattr(self.model, name)

        @functools.wraps(fn)
        def call(model: nn.Module, *args: Any) -> Any:
            if model is not self.model:
                raise ValueError("FsdpRun.root_forward: called with another model than the sharded one")
            return method(*args)

        return call

    def sync_gradients(self, last_micro_batch: bool) -> None:
        """Reduce-scatter only after the step's last micro-batch (the others accumulate locally)."""
        for m in self.modules:
            m.set_requires_gradient_sync(last_micro_batch)

    def grads_to_local(self) -> None:
        """Hand each sharded gradient's local part to the optimizer's local parameter (no copy); the gradients of
        the parameters kept whole are summed over the ranks first (one flat all-reduce, as DDP's)."""
        whole = [p for p in self.params if not _is_dtensor(p)]
        if whole:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in whole])
            dist.all_reduce(flat)  # (sum of their numel,)
            offset = 0
            for p in whole:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        for p, mine in zip(self.params, self.locals, strict=True):
            mine.grad = None if p.grad is None else local(p.grad)

    def zero_grad(self) -> None:
        for p, mine in zip(self.params, self.locals, strict=True):
            p.grad, mine.grad = None, None

    def clip(self, max_norm: float) -> float:
        """The global gradient norm (all shards), and the gradients scaled as ``clip_grad_norm_`` does."""
        grads = [g for g in (m.grad for m in self.locals) if g is not None]
        squares, whole = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for p, mine in zip(self.params, self.locals, strict=True):
            if mine.grad is not None:
                (squares if _is_dtensor(p) else whole).add_(mine.grad.double().pow(2).sum())
        dist.all_reduce(squares)  # the shards of every rank; a whole parameter's gradient is the same on each
        squares += whole
        norm = float(squares.sqrt())
        if max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm

    def unsharded(self) -> contextlib.AbstractContextManager[None]:
        """Every FSDP module all-gathered (the model's parameters whole, plain tensors) for the duration."""
        return whole_model(self.model)

    def full_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with every per-shard state tensor gathered to the full parameter's shape."""
        from torch.distributed.tensor import DTensor

        sd = optimizer.state_dict()
        state = {}
        for index, entry in sd["state"].items():
            p = self.params[int(index)]
            full = {}
            for name, value in entry.items():
                if name == "step" or not _is_dtensor(p):  # a parameter kept whole: its state is whole already
                    full[name] = value
                elif name.endswith("_absmax"):  # 8-bit block scales: (this rank's blocks,) -> (all blocks,)
                    full[name] = self._gather_blocks(value, p)
                elif tuple(value.shape) == tuple(local(p).shape):  # moments or uint8 codes, shaped as the shard
                    full[name] = DTensor.from_local(value.contiguous(), p.device_mesh, p.placements,
                                                    shape=p.shape, stride=p.stride()).full_tensor()
                else:
                    raise ConfigError(f"--distributed fsdp: the optimizer state {name!r} of {self.names[int(index)]} "
                                      f"has shape {tuple(value.shape)}, neither its shard's {tuple(local(p).shape)} "
                                      "nor 8-bit block scales; this optimizer's state cannot be consolidated")
            state[index] = full
        sd["state"] = state
        return sd

    def local_state(self, full_sd: dict) -> dict:
        """The inverse of ``full_state``: each full state tensor cut to this rank's shard."""
        state = {}
        for index, entry in full_sd["state"].items():
            p = self.params[int(index)]
            state[index] = {name: self._cut(name, value, tuple(p.shape)) if _is_dtensor(p) else value
                            for name, value in entry.items()}
        return {**full_sd, "state": state}

    def _cut(self, name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's piece of one full state tensor (8-bit block scales by block, the rest by dim-0 rows)."""
        if name == "step":
            return value
        if name.endswith("_absmax"):
            first, count = block_range(shape, self.rank, self.world)
            return value[first : first + count].clone()  # (this rank's blocks,)
        return shard_of(value, self.rank, self.world)

    def _gather_blocks(self, mine: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Every rank's 8-bit block scales (``block_range``'s counts) concatenated in rank order (a collective)."""
        shape = tuple(p.shape)
        if not aligned_8bit(shape, self.world):  # such parameters are kept whole (never DTensors): a guard
            raise ConfigError(f"8-bit state of {shape} is not block-aligned on {self.world} ranks")
        counts = [block_range(shape, r, self.world)[1] for r in range(self.world)]
        padded = torch.zeros(max(counts), dtype=mine.dtype, device=mine.device)  # (most blocks of a rank,)
        padded[: mine.numel()] = mine
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded, group=p.device_mesh.get_group())
        return torch.cat([piece[:n] for piece, n in zip(pieces, counts, strict=True)])  # (num_blocks(numel),)


class Consolidated:
    """An optimizer stand-in whose ``state_dict()`` is ``FsdpRun.full_state``'s (what a checkpoint writes)."""

    def __init__(self, full_sd: dict) -> None:
        self._sd = full_sd

    def state_dict(self) -> dict:
        return self._sd


def shard_for_training(model: nn.Module, trainable: Sequence[torch.Tensor], world: int, rank: int,
                       param_dtype: torch.dtype | None, min_8bit_size: int | None = None) -> FsdpRun:
    """``fully_shard_model`` and the sharded trainable parameters matched to ``trainable``'s order.

    ``min_8bit_size``: the optimizer keeps 8-bit state from that size on (None: 32-bit state); a parameter that
    does and breaks the 8-bit rule stays whole on every rank (``unaligned_8bit``).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in trainable]
    whole = [] if min_8bit_size is None else unaligned_8bit([tuple(p.shape) for p in trainable], world, min_8bit_size)
    modules = fully_shard_model(model, world, param_dtype, [trainable[i] for i in whole])
    by_name = dict(model.named_parameters())
    params = [by_name[n] for n in order]
    with torch.no_grad():
        locals_ = [local(p).detach() for p in params]
    return FsdpRun(model=model, modules=modules, params=params, locals=locals_, world=world, rank=rank, names=order)
