"""Several sequences decoded together on one base, each with its own LoRA adapter and its own KV cache.

The S-LoRA / Punica idea: all rows of a decoding step share one pass through each base projection, and
each row adds only its own adapter's update. For an adapted linear and rows ``x_i`` whose sequence uses
adapter ``a(i)`` (or none):

    y_i = base(x_i) + scale_a * B_a A_a x_i        for a(i) = a,    y_i = base(x_i)  for the base model

The batch is kept ordered by adapter, so the rows of one adapter are one contiguous run ``rows``; the
update of a run is that adapter's own ``LoraLinear.add_delta`` on ``x[rows]`` (no copy of its math), and
the base part is the base layer's bound projection on all rows at once (``quant.linear.bind_linear``).

Attention is per row: every sequence keeps its own preallocated cache ``(1, kv_heads, max_len, hd)`` per
layer and its own position, and ``lean._Layer.step_rows`` attends each row over its own cache only -- no
padding and no mask, so a row sees exactly the keys it would see decoded alone. Prefill runs one
sequence at a time (``LeanDecoder.forward`` with the sequence's cache and adapter), the computation
``generate.decode`` does for that request alone.

How close to decoding alone: prefill is the same computation, bit for bit. A decode step with one row is
too. With N > 1 rows the element-wise parts, norms, RoPE and attention are still per row and equal, but
the matrix products take other kernels (the 4-bit GEMV's several-row loop, BLAS for the head and the
small LoRA products) that sum in another order, so the logits agree to fp32 rounding, not bit for bit
(``tests/generate/test_batched.py`` holds them within 1e-5 and the greedy tokens equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlorakit.errors import ConfigError
from qlorakit.generate.lean import LeanDecoder, unsupported_reason
from qlorakit.lora.layer import LoraLinear
from qlorakit.quant.linear import Projection, bind_linear


class RowAdapters:
    """The adapter of each contiguous run of rows in the forward under way: ``[(name or None, slice), ...]``."""

    def __init__(self) -> None:
        self.runs: list[tuple[str | None, slice]] = []

    def set(self, adapters: list[str | None]) -> None:
        """Runs of equal consecutive names; ``adapters[i]`` is row i's adapter (``None``: the base)."""
        runs: list[tuple[str | None, slice]] = []
        start = 0
        for i in range(1, len(adapters) + 1):
            if i == len(adapters) or adapters[i] != adapters[start]:
                runs.append((adapters[start], slice(start, i)))
                start = i
        self.runs = runs


def bind_rows(module: nn.Module, rows: RowAdapters) -> Projection:
    """A projection whose rows each add their own adapter: x (N, in) -> (N, out); see the module docstring.

    A run covering every row takes ``add_delta`` on the base's own output, as ``LoraLinear.bind()`` does; a
    partial run writes ``add_delta`` of its slice back into its rows. Adapters a layer does not have leave
    its rows at the base output (an adapter may target only some modules).
    """
    if not isinstance(module, LoraLinear):
        return bind_linear(module)
    if module.merged_adapter is not None:
        raise ConfigError(f"adapter {module.merged_adapter!r} is merged into the base; unmerge it before batching")
    base = bind_linear(module.base_layer)
    adapters = module.lora_A

    def projection(x: torch.Tensor) -> torch.Tensor:  # x: (N, in)
        result = base(x)  # (N, out)
        for name, run in rows.runs:
            if name is None or name not in adapters:
                continue
            if run.start == 0 and run.stop == x.shape[0]:
                result = module.add_delta(name, x, result)
            else:
                result[run] = module.add_delta(name, x[run], result[run].clone())
        return result

    return projection


@dataclass
class Sequence:
    """One request's decoding state: its adapter, its per-layer (keys, values) and the positions filled."""

    adapter: str | None
    max_len: int
    caches: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    length: int = 0


class BatchDecoder:
    """Prefill one sequence at a time, then decode any set of sequences one token each per ``step``."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model, 1)
        if reason is not None:
            raise ConfigError(f"the batched decoder cannot run this model: {reason}")
        self.model = model
        self.rows = RowAdapters()
        self.lean = LeanDecoder(model, 0, bind=lambda module: bind_rows(module, self.rows))

    def new_sequence(self, adapter: str | None, max_len: int) -> Sequence:
        """An empty sequence for ``max_len`` positions (prompt + new tokens) that adds ``adapter`` (None: base)."""
        reason = unsupported_reason(self.model, max_len)
        if reason is not None:
            raise ConfigError(f"the batched decoder cannot run this request: {reason}")
        weight = self.lean.embed.weight
        caches = [layer.new_cache(max_len, weight.dtype, weight.device) for layer in self.lean.layers]
        return Sequence(adapter, max_len, caches)

    @torch.inference_mode()
    def prefill(self, sequence: Sequence, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt through ``sequence``'s cache; return the logits of its last position, ``(vocab,)``."""
        self._check_room(sequence, len(prompt_ids))
        self.rows.set([sequence.adapter] * len(prompt_ids))
        device = self.lean.embed.weight.device
        logits = self.lean.forward(torch.tensor([prompt_ids], device=device), sequence.length, sequence.caches)
        sequence.length += len(prompt_ids)
        return logits

    @torch.inference_mode()
    def step(self, sequences: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to ``sequences[i]`` at its next position; return the logits ``(N, vocab)``.

        Rows of one adapter should be adjacent (each run of equal adapters costs one ``add_delta`` per layer).
        """
        for sequence in sequences:
            self._check_room(sequence, 1)
        lean = self.lean
        self.rows.set([s.adapter for s in sequences])
        device = lean.embed.weight.device
        h = lean.embed(torch.tensor(tokens, device=device))  # (N, d)
        starts = [s.length for s in sequences]
        cos, sin = lean.rotary(h.unsqueeze(0), torch.tensor([starts], device=device))  # (1, N, hd) each
        cos, sin = cos[0], sin[0]  # (N, hd)
        for index, layer in enumerate(lean.layers):
            h = layer.step_rows(h, cos, sin, starts, [s.caches[index] for s in sequences])
        for sequence in sequences:
            sequence.length += 1
        return lean.head(lean.norm(h))  # (N, vocab)

    @staticmethod
    def _check_room(sequence: Sequence, count: int) -> None:
        if sequence.length + count > sequence.max_len:
            raise ConfigError(f"{sequence.length + count} positions exceed the sequence's max_len {sequence.max_len}")
