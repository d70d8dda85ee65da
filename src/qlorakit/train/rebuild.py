"""Saved tensors rebuilt in backward from tensors backward keeps anyway: the inputs of LoRA's down-projections.

A frozen base linear needs nothing of its input for backward (``dL/dx = g W``), but its adapter's ``A``
does (``dL/dA = g_u^T dropout(x)``, ``lora.dropout``), so without checkpointing every decoder block keeps, for
its adapters alone, tensors that no other op keeps:

    h1 = norm_1(x) * w_1          the q/k/v group's input, (..., d)   from x and w_1 (RMSNorm keeps x)
    h2 = norm_2(y) * w_2          the gate/up group's input, (..., d) from y and w_2 (RMSNorm keeps y)
    m  = silu(gate) * up          down_proj's input, (..., f)         from gate and up (``train.recompute``
                                                                      keeps both)

Inside a decoder block (``rebuild_adapter_inputs(model)`` wraps each block's forward), the fused RMSNorm
(``train.rmsnorm``), the SwiGLU product (``train.recompute``) and the packed rows' attention output
(``train.varlen``: o_proj's input, a copy of what SDPA keeps) ``offer`` their output with the function and
arguments that made it; a ``torch.autograd.graph.saved_tensors_hooks`` pair then packs any saved tensor that
is an offered output, or a view of one (the attention output reaches o_proj reshaped), as that recipe, and
unpacking in backward runs the recipe again (no grad) and takes the same view of it. A saved tensor matches
an offer when it lies inside the offered output's memory; the block holds its offered outputs until its
forward ends, so that memory cannot hold another tensor meanwhile (a view can outlive the Python object of
its base, so a weak reference would not do), and lets them go then. The recipes are the very functions the
forwards run (one formula each, ``rmsnorm.normalize``, ``recompute.silu_mul_value``; the attention output
is a pure copy), so the rebuilt tensor is bit-identical and so are all gradients
(``tests/train/test_rebuild.py``). Saved per block: ``2 d + f`` values of the compute dtype, and ``d`` more
with packed rows (SmolLM2, 2 x 512 tokens, fp32: 10.5 + 2.25 MiB of 37); cost: two RMSNorms and one
SiLU-product per block in backward, elementwise, and one copy.

The lean dropout path (``lora.dropout``, a training ``nn.Dropout``) saves the offered tensor itself; without
dropout the A matmul saves a 2-D view of its input, which is matched as a view. Only in blocks that gradient
checkpointing does not recompute (``skip``): torch's non-reentrant checkpoint packs a block's saved tensors with
its own hooks (innermost hooks win), and with it the block's tensors live only through its recompute.
The recipes hold their arguments (tensors other ops keep for backward) as long as the graph holds them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qlorakit.train import allocator
from qlorakit.train.patching import patched_forwards

#: The offers of the decoder block being run: storage address -> [(the output, function, arguments)].
_Offers = dict[int, list[tuple[torch.Tensor, Callable[..., torch.Tensor], tuple[Any, ...]]]]
_active: list[_Offers] = []


def offering() -> bool:
    """Whether ``offer`` would keep anything: inside a rebuilding decoder block while a graph is recorded. Not in
    a block that gradient checkpointing recomputes (no scope there): reading a saved tensor back in its forward
    would make checkpoint recompute the block then (``train.varlen.kept_output``)."""
    return bool(_active) and torch.is_grad_enabled()


def offer(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> None:
    """``out`` equals ``fn(*args)`` (bit for bit, same shape and strides): if backward would keep it, or a view
    of it, keep the recipe instead. A no-op outside ``rebuild_adapter_inputs``' blocks and when nothing records
    a graph."""
    if offering() and out.numel():
        _active[-1].setdefault(out.untyped_storage().data_ptr(), []).append((out, fn, args))


class _Recipe:
    __slots__ = ("fn", "args", "view")

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple[Any, ...], view: tuple | None) -> None:
        self.fn, self.args, self.view = fn, args, view  # view: (shape, strides, offset from the output's)


def _unpack(packed: Any) -> torch.Tensor:
    if not isinstance(packed, _Recipe):
        return packed
    with torch.no_grad():
        out = packed.fn(*packed.args)
    if packed.view is None:
        return out
    shape, strides, delta = packed.view
    return out.as_strided(shape, strides, out.storage_offset() + delta)


def _inside(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Every element of ``t`` lies in ``out``'s memory (same storage, dtype; ``out`` contiguous)."""
    if t.dtype != out.dtype or not out.is_contiguous():
        return False
    first = t.storage_offset() - out.storage_offset()
    last = first + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return 0 <= first and last < out.numel() and min(t.stride(), default=1) >= 0


def _match(offers: _Offers, t: torch.Tensor) -> _Recipe | None:
    if not t.numel():
        return None
    for out, fn, args in offers.get(t.untyped_storage().data_ptr(), ()):
        if out is t:
            return _Recipe(fn, args, None)
        if _inside(t, out):
            return _Recipe(fn, args, (tuple(t.shape), t.stride(), t.storage_offset() - out.storage_offset()))
    return None


@contextmanager
def _block_scope() -> Iterator[None]:
    offers: _Offers = {}

    def pack(t: torch.Tensor) -> Any:
        recipe = _match(offers, t) if offers else None
        return t if recipe is None else recipe

    _active.append(offers)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _active.pop()  # the block's offered outputs are let go
        offers.clear()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Llama-style model: the entries of its ``layers`` ModuleList."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _scoped_forward(rebuilding: list[nn.Module], trim: bool):
    def make(layer: nn.Module):
        own = type(layer).forward
        rebuild = any(layer is other for other in rebuilding)

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
def rebuild_adapter_inputs(model: nn.Module, enabled: bool = True, trim_each_block: bool = False,
                           skip: int = 0) -> Iterator[int]:  # fmt: skip
    """``with rebuild_adapter_inputs(model) as n: ...``: ``n`` decoder blocks rebuild offered outputs in backward
    (when ``enabled``; all but the first ``skip``, the blocks that gradient checkpointing recomputes) and, with
    ``trim_each_block``, every block calls ``train.allocator.trim_heap`` before its forward while a graph is
    recorded (``memory.malloc_trim_blocks``: the forward's freed temporaries would otherwise stay resident in
    glibc's heap under the dynamic mmap threshold, docs/memory.md)."""
    layers = decoder_layers(model) if enabled or trim_each_block else []
    rebuilding = layers[skip:] if enabled else []
    with patched_forwards(layers if trim_each_block else rebuilding, _scoped_forward(rebuilding, trim_each_block)):
        yield len(rebuilding) if enabled else len(layers)
