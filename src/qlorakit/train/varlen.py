"""Variable-length attention for packed rows on CPU: transformers' SDPA forward run on each example's span.

A packed row ``x_1 ; ... ; x_k`` (``data/packing.py``) marks its examples by ``position_ids`` that restart at
0. transformers' own packed path builds a block-diagonal causal mask ``M (B, 1, T, T)`` and runs SDPA on the
whole row: ``softmax(Q K^T * scale + log M) V`` costs ``T^2`` scores per head although only
``sum_j |x_j|^2 / 2`` of them are kept. ``varlen_sdpa_forward`` computes, for every span ``[s, e)`` of a row,

    out[s:e] = sdpa_attention_forward(Q[s:e], K[s:e], V[s:e], is_causal=True)

(transformers' SDPA forward, the one the model uses otherwise) and concatenates the spans: the same values as
the masked row (a key outside the span has weight ``exp(-inf) = 0`` there; tests hold the two to fp32
rounding) at ``sum_j |x_j|^2 / 2`` scores. Padding continues the last span's positions, so it is part of that
span; nothing before it attends to it (causal) and it carries no loss.

In bf16 (and fp16) torch's CPU flash kernel keeps buffers for every sequence length it has seen: 300 backward
passes at random lengths of 16-1,024 kept 990 MiB of glibc heap, at one length 3 MiB (fp32 keeps none). A packed
row's spans take every length, so the heap grew by ~20 MiB a step over a whole run. In those dtypes, when
grad is enabled (training: the growth is the backward's), each span runs at a bucketed length
``Lb = g ceil(L / g)``, ``g = max(SPAN_BUCKET, 2^floor(log2 L) / 8)`` (at most 8
lengths per octave, at most 12.5% longer past ``8 SPAN_BUCKET``): the span is extended over the tokens that
follow it in the row, or zero-padded at the row's end, and only its first ``L`` outputs are kept. Exact: a kept
query attends only to keys before it, and the extra queries' outputs are dropped, so nothing flows back
through them. It is not applied without grad: the packing check (``train.packed``) compares a packed example
with the same example alone to one 16-bit rounding step, and the bucketed kernel's different blocking, over
SmolLM2's 30 bf16 layers, moved the logits by 2.8e-2 of their size (the check's bound is 2e-2).

The output (o_proj's input) is a copy of what SDPA's backward keeps anyway: transformers returns
``raw.transpose(1, 2).contiguous()`` of the kernel's output ``raw (B, H, L, D)``, and the spans are concatenated.
When the autograd graph shows exactly that (``kept_output``: clone <- transpose <- view <- a node keeping
``output``), the result is offered to ``train.rebuild`` with the kept outputs (``stitch``), so a decoder block
keeps ``B T d`` fewer values (o_proj's adapter input is rebuilt in backward, a copy, bit-identical); otherwise,
e.g. a masked batch whose kernel keeps no output, nothing is offered and the copy is kept.

The implementation is registered with transformers' ``AttentionInterface`` as ``VARLEN`` together with a
mask function that builds no mask for packed rows (the spans replace it) and SDPA's mask otherwise; inputs
with a mask (unpacked, padded batches), a cache, or one span per row go to ``sdpa_attention_forward``
unchanged. ``train.rewrites`` switches a CPU model whose attention is ``sdpa`` to it when ``data.packing``
is on, and back on exit.
"""

from __future__ import annotations

import torch

from qlorakit.train import rebuild

VARLEN = "qlorakit_varlen_sdpa"
#: The autograd nodes allowed between transformers' SDPA result and the kernel's output: ``.contiguous()`` (a
#: clone, or nothing when the layout already is), ``.transpose(1, 2)`` and ``.reshape(B, -1, L, D)`` (a view of
#: the same shape: it undoes transformers' GQA packing of a single query, a no-op here).
_CLONE, _TRANSPOSE = "CloneBackward0", "TransposeBackward0"
_SAME_SHAPE_VIEWS = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0")
#: The smallest step of the bucketed span lengths in bf16/fp16 (module docstring).
SPAN_BUCKET = 64


def bucketed(length: int) -> int:
    """``length`` rounded up to its bucket: a multiple of ``max(SPAN_BUCKET, 2^floor(log2 length) / 8)``."""
    step = max(SPAN_BUCKET, (1 << (length.bit_length() - 1)) // 8)
    return -(-length // step) * step


def kept_output(out: torch.Tensor) -> torch.Tensor | None:
    """The kernel output ``raw (B, H, L, D)`` that SDPA's backward keeps, when ``out (B, L, H, D)`` (transformers'
    ``sdpa_attention_forward`` result) is ``raw.transpose(1, 2).contiguous()`` by its autograd graph; else None."""
    node, names, views = out.grad_fn, [], []
    while node is not None and not hasattr(node, "_saved_output") and len(names) < 3:
        names.append(type(node).__name__)
        if names[-1] == _TRANSPOSE and sorted((node._saved_dim0 % 4, node._saved_dim1 % 4)) != [1, 2]:
            return None
        if names[-1] in _SAME_SHAPE_VIEWS:
            views.append(tuple(node._saved_self_sym_sizes))
        node = node.next_functions[0][0] if node.next_functions else None
    raw = getattr(node, "_saved_output", None) if node is not None else None
    if not isinstance(raw, torch.Tensor) or raw.dtype != out.dtype or raw.dim() != 4:
        return None
    if names.count(_TRANSPOSE) != 1 or not set(names) <= {_CLONE, _TRANSPOSE, *_SAME_SHAPE_VIEWS}:
        return None
    if raw.transpose(1, 2).shape != out.shape or any(shape != tuple(raw.shape) for shape in views):
        return None
    return raw


def stitch(rows: list[list[tuple[torch.Tensor, int]]]) -> torch.Tensor:
    """The attention output from the kernels' kept outputs: per row, the first ``n`` positions of each span's
    ``raw (1 or B, H, L, D)``, concatenated; ``(B, T, H, D)``, the values the forward's copies hold."""
    return torch.cat([torch.cat([raw.transpose(1, 2)[:, :n] for raw, n in row], dim=1) for row in rows], dim=0)


def _offered(out: torch.Tensor, rows: list[list[tuple[torch.Tensor, int]]]) -> torch.Tensor:
    """``out``, offered to ``train.rebuild`` as ``stitch(rows)`` when every span's kernel output was found."""
    if all(raw is not None for row in rows for raw, _ in row):
        rebuild.offer(out, stitch, rows)
    return out


def _sdpa(module, query, key, value, mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``sdpa_attention_forward`` and, inside a rebuilding block (``rebuild.offering``), its kept
    kernel output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]  # (B, L, H, D)
    return out, kept_output(out) if out.grad_fn is not None and rebuild.offering() else None


def _span(module, query, key, value, b: int, s: int, e: int, bucket: bool, **kwargs):
    """``sdpa_attention_forward`` of row ``b``'s span ``[s, e)``, causal, at the bucketed length when ``bucket``:
    ``(1, e - s, H, D)``, and the kernel output it was copied from (``_sdpa``)."""
    stop = s + bucketed(e - s) if bucket else e
    q, k, v = (t[b : b + 1, :, s:stop] for t in (query, key, value))  # (1, H, <= stop - s, D)
    if q.shape[2] < stop - s:  # the row ends first: zeros after it
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, stop - s - t.shape[2])) for t in (q, k, v))
    out, raw = _sdpa(module, q, k, v, None, **kwargs, is_causal=True)
    return out[:, : e - s], raw


def spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``[start, stop)`` ranges that begin where the position is 0 (or at the row start)."""
    out = []
    for row in position_ids.tolist():  # (B, T) -> B lists
        starts = [0] + [t for t in range(1, len(row)) if row[t] == 0]
        out.append(list(zip(starts, starts[1:] + [len(row)], strict=True)))
    return out


def varlen_sdpa_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """``sdpa_attention_forward`` per span of each packed row; ``(output (B, T, H, D), None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query: (B, H, T, D); key, value: (B, H_kv, T, D)
    kwargs.pop("is_causal", None)  # causal within each span; decided below
    same_length = query.shape[2] == key.shape[2]
    if attention_mask is not None or position_ids is None or not same_length or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    row_spans = spans(position_ids.expand(query.shape[0], -1))
    if all(len(s) == 1 for s in row_spans):
        out, raw = _sdpa(module, query, key, value, None, **kwargs)  # (B, T, H, D)
        return _offered(out, [[(raw, query.shape[2])]]), None
    bucket = query.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
    rows, kept = [], []
    for b, parts in enumerate(row_spans):
        pieces = [_span(module, query, key, value, b, s, e, bucket, **kwargs) for s, e in parts]
        rows.append(torch.cat([out for out, _ in pieces], dim=1))  # (1, T, H, D)
        kept.append([(raw, e - s) for (_, raw), (s, e) in zip(pieces, parts, strict=True)])
    return _offered(torch.cat(rows, dim=0), kept), None  # (B, T, H, D)


def varlen_mask(*args, **kwargs):
    """No mask where the spans do the work (no 2-D padding mask given); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register ``VARLEN`` with transformers' attention and mask interfaces (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN
