"""One LoRA down-projection for sibling projections that read the same input (q/k/v, gate/up).

In a decoder block ``q_proj``, ``k_proj`` and ``v_proj`` all read the normed hidden state ``h``, and so do
``gate_proj`` and ``up_proj``. Unfused, each LoRA layer computes its own ``h A_i^T``; fused, the group
computes once

    [u_1 | ... | u_k] = h @ [A_1; ...; A_k]^T        h: (..., in), A_i: (r_i, in), u_i: (..., r_i)

and hands each layer its slice ``u_i`` (one matmul with ``sum r_i`` outputs instead of ``k`` with ``r_i``,
and in backward one ``dL/dh`` matmul and one ``dL/dA`` matmul instead of ``k`` each). The product is
``lora.layer.dropped_down`` (what each ``lora_A`` computes alone, with its dropout), and each layer's
``LoraLinear.add_delta`` adds ``scale * u_i B_i^T`` as it does unfused: this module only decides how
the ``A`` product is shared.
The adapters stay separate parameters: ``fuse_shared_inputs`` replaces each ``lora_A[name]`` ``nn.Linear``
by a ``SharedInputA`` holding the *same* weight ``Parameter``, so state dicts, PEFT files, optimizers and
merges see exactly what they saw before (``unfuse`` restores plain ``nn.Linear`` modules around the same
weights).

The group reuses its product only for the very tensor object it computed it from (``x is cached_input``)
and only until every member has taken its slice; any other input is computed unfused. The group is handed
each layer's input before the cast to the adapter dtype, so a 16-bit base with fp32 adapters fuses too: the
shared ``h`` is cast once per group instead of once per layer.

Dropout. Unfused, each layer draws its own mask: ``u_i = (m_i * h) A_i^T`` with independent
``m_i ~ Bernoulli(1 - p) / (1 - p)`` (PEFT's semantics). Fused, the group draws ONE mask ``m`` for its
shared input, with the dropout module of the member that computes the product (the first caller; every
member must have the same dropout type and ``p``, else the group is not fused):

    [u_1 | ... | u_k] = (m * h) @ [A_1; ...; A_k]^T        m: (..., in), one draw per group and forward

so q/k/v see one mask and gate/up another (each member's expected update and its variance are those of
the unfused layer; only the masks of siblings are correlated). Gradient checkpointing recomputes the same
mask (torch's checkpoint restores the RNG state). ``memory.fuse_lora: false`` keeps the independent masks.
Tests hold the fused group to a reference that applies the group's mask to each member separately
(forward and gradients within fp32 rounding); without dropout, fused equals unfused within fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlorakit.lora.layer import LoraLinear, dropped_down
from qlorakit.lora.model import lora_layers

#: Sibling module names that read the same input in Llama-style blocks (attention, MLP).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputA(nn.Module):
    """``lora_A`` of one member of a ``_Group``: same ``weight`` (r, in) as the ``nn.Linear`` it replaces."""

    def __init__(self, linear: nn.Linear, group: _Group) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter: (r, in)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._group = group  # a plain object, not a submodule

    def forward(self, x: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:  # x: (..., in) -> (..., r)
        """This member's slice of ``dropout(h) @ [A_1; ...; A_k]^T`` with ``h`` = ``x`` in the adapter dtype;
        the cast and ``dropout`` (the calling layer's) happen once per group input (``None`` or
        ``nn.Identity``: no dropout)."""
        return self._group.down(self, x, dropout)

    def as_linear(self) -> nn.Linear:
        """This module made the bias-free ``nn.Linear`` it replaced, in place: the same object around the same
        ``weight``. In place because others may hold the module: FSDP2 sets a sharded layer's parameter on the
        module that owned it when ``fully_shard`` ran (sharded after a forward, whole inside ``unshard()``), so
        a new ``nn.Linear`` would keep the sharded DTensor for good (safetensors: "invalid python storage")."""
        del self._group
        self.__class__ = nn.Linear  # type: ignore[assignment]
        self.register_parameter("bias", None)
        return self  # type: ignore[return-value]


class _Group:
    """The members of one shared-input group and the last fused product, until each member took its slice."""

    def __init__(self) -> None:
        self.members: list[SharedInputA] = []
        self._input: torch.Tensor | None = None
        self._slices: dict[int, torch.Tensor] = {}
        self.products = 0  # fused matmuls computed (tests read it)

    def down(self, member: SharedInputA, x: torch.Tensor, dropout: nn.Module | None) -> torch.Tensor:
        if x is not self._input:  # a new input: one cast, one mask and one matmul for every member
            weights = [m.weight for m in self.members]
            fused = dropped_down(x, torch.cat(weights), dropout)  # (..., sum r): x cast once, inside
            parts = fused.split([w.shape[0] for w in weights], dim=-1)  # (..., r_i) each
            self.products += 1
            self._input, self._slices = x, {id(m): p for m, p in zip(self.members, parts, strict=True)}
        elif id(member) not in self._slices:  # the same input again for a member that took its slice
            return dropped_down(x, member.weight, dropout)  # (..., r): its own mask
        out = self._slices.pop(id(member))
        if not self._slices:
            self._input = None
        return out


def _dropout_kind(module: nn.Module) -> tuple[type, float | None]:
    return type(module), getattr(module, "p", None)


def _fusable(layers: list[LoraLinear], name: str) -> bool:
    """Siblings that carry ``name`` unmerged, with one dropout (type and ``p``), as plain ``nn.Linear`` A's of one
    dtype and device."""
    if len(layers) < 2 or any(name not in m.lora_A or m.merged_adapter is not None for m in layers):
        return False
    if len({_dropout_kind(m.lora_dropout[name]) for m in layers}) != 1:
        return False  # the group's one mask could not stand for every member's dropout
    kinds = {(m.lora_A[name].weight.dtype, m.lora_A[name].weight.device) for m in layers}
    return all(type(m.lora_A[name]) is nn.Linear for m in layers) and len(kinds) == 1


def fuse_shared_inputs(model: nn.Module, name: str | None = None) -> list[tuple[str, ...]]:
    """Fuse adapter ``name``'s (default: each layer's active) ``A`` across shared-input siblings; return the groups.

    Groups are siblings under one parent named as in ``SHARED_INPUT_GROUPS``, all carrying the adapter,
    unmerged, with plain ``nn.Linear`` ``lora_A`` of one dtype. Calling it again fuses nothing twice.
    """
    layers = lora_layers(model)
    fused: list[tuple[str, ...]] = []
    for path, layer in layers.items():
        parent, _, child = path.rpartition(".")
        for names in SHARED_INPUT_GROUPS:
            if child != names[0]:
                continue
            siblings = (f"{parent}.{n}" if parent else n for n in names)
            paths = tuple(p for p in siblings if p in layers)
            adapter = name or layer.active_adapter
            members = [layers[p] for p in paths]
            if adapter is None or not _fusable(members, adapter):
                continue
            group = _Group()
            for member in members:
                proxy = SharedInputA(member.lora_A[adapter], group)
                group.members.append(proxy)
                member.lora_A[adapter] = proxy
            fused.append(paths)
    return fused


def unfuse(model: nn.Module) -> int:
    """Put plain ``nn.Linear`` ``lora_A`` modules (same weights) back everywhere; return how many were replaced."""
    count = 0
    for layer in lora_layers(model).values():
        for adapter, module in list(layer.lora_A.items()):
            if isinstance(module, SharedInputA):
                layer.lora_A[adapter] = module.as_linear()
                count += 1
    return count


@contextmanager
def shared_input_fusion(model: nn.Module, enabled: bool = True) -> Iterator[list[tuple[str, ...]]]:
    """``with shared_input_fusion(model): ...`` fuses (when ``enabled``) and unfuses again on the way out."""
    groups = fuse_shared_inputs(model) if enabled else []
    try:
        yield groups
    finally:
        if groups:
            unfuse(model)
