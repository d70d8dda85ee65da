"""Saved tensors rebuilt in backward from tensors backward keeps anyway: the inputs of LoRA's down-projections.

A frozen base linear needs nothing of its input for backward (``dL/dx = g W``), but its adapter's ``A``
does (``dL/dA = g_u^T dropout(x)``, ``lora.dropout``), so without checkpointing every decoder block keeps, for
its adapters alone, tensors that no other op keeps:

    h1 = norm_1(x) * w_1          the q/k/v group's input, (..., d)   from x and w_1 (RMSNorm keeps x)
    h2 = norm_2(y) * w_2          the gate/up group's input, (..., d) from y and w_2 (RMSNorm keeps y)
    m  = silu(gate) * up          down_proj's input, (..., f)         from gate and up (``train.recompute``
                                                                      keeps both)

Inside a decoder block (``rebuild_adapter_inputs(model)`` wraps each block's forward), the fused RMSNorm
(``train.rmsnorm``) and the SwiGLU product (``train.recompute``) ``offer`` their output with the function
and arguments that made it; a ``torch.autograd.graph.saved_tensors_hooks`` pair then packs any saved tensor
that *is* an offered output (the same tensor object, still alive: looked up by storage, offset, shape,
strides and dtype, then checked by identity, since a freed output's address can hold another tensor of its
shape) as that recipe, and unpacking in
backward runs the recipe again (no grad). The recipes are the very functions the forwards run (one
formula each, ``rmsnorm.normalize``, ``recompute.silu_mul_value``), so the rebuilt tensor is bit-identical
and so are all gradients (``tests/train/test_rebuild.py``). Saved per block: ``2 d + f`` values of the
compute dtype (SmolLM2, 2 x 512 tokens, fp32: 10.5 MiB of 37); cost: two RMSNorms and one SiLU-product per
block in backward, elementwise.

Only the lean dropout path (``lora.dropout``, a training ``nn.Dropout``) saves the offered tensor itself; without
dropout the A matmul saves a 2-D view of its input, which is not matched (kept as before). Only without
gradient checkpointing: torch's non-reentrant checkpoint packs a block's saved tensors with
its own hooks (innermost hooks win), and with it the block's tensors live only through its recompute.
The recipes hold their arguments (tensors other ops keep for backward) as long as the graph holds them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qlorakit.train import allocator
from qlorakit.train.patching import patched_forwards

#: The recipes of the decoder block being run: key of an offered output -> (the output, weakly; function, arguments).
_active: list[dict[tuple, tuple[weakref.ref, Callable[..., torch.Tensor], tuple[Any, ...]]]] = []


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def offer(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> None:
    """``out`` equals ``fn(*args)`` (bit for bit): if backward would keep it, keep the recipe instead.
    A no-op outside ``rebuild_adapter_inputs``' blocks and when nothing records a graph."""
    if _active and torch.is_grad_enabled():
        _active[-1][_key(out)] = (weakref.ref(out), fn, args)


class _Recipe:
    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, _Recipe):
        with torch.no_grad():
            return packed.fn(*packed.args)
    return packed


@contextmanager
def _block_scope() -> Iterator[None]:
    recipes: dict[tuple, tuple[weakref.ref, Callable[..., torch.Tensor], tuple[Any, ...]]] = {}

    def pack(t: torch.Tensor) -> Any:
        entry = recipes.get(_key(t)) if recipes else None
        # the very tensor offered, still alive: a freed output's address may hold another tensor of its shape
        if entry is None or entry[0]() is not t:
            return t
        return _Recipe(entry[1], entry[2])

    _active.append(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _active.pop()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Llama-style model: the entries of its ``layers`` ModuleList."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _scoped_forward(rebuild: bool, trim: bool):
    def make(layer: nn.Module):
        own = type(layer).forward

        def forward(*args, **kwargs):
            if trim and torch.is_grad_enabled():
                allocator.trim_heap()  # the previous block's freed temporaries go back to the OS
            if not rebuild:
                return own(layer, *args, **kwargs)
            with _block_scope():
                return own(layer, *args, **kwargs)

        return forward

    return make


@contextmanager
def rebuild_adapter_inputs(model: nn.Module, enabled: bool = True, trim_each_block: bool = False) -> Iterator[int]:
    """``with rebuild_adapter_inputs(model) as n: ...``: ``n`` decoder blocks rebuild offered outputs in backward
    (when ``enabled``) and, with ``trim_each_block``, call ``train.allocator.trim_heap`` before each block's
    forward while a graph is recorded (``memory.malloc_trim_blocks``: the forward's freed temporaries would
    otherwise stay resident in glibc's heap under the dynamic mmap threshold, docs/memory.md)."""
    layers = decoder_layers(model) if enabled or trim_each_block else []
    with patched_forwards(layers, _scoped_forward(enabled, trim_each_block)) as count:
        yield count
