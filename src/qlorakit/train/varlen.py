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

The implementation is registered with transformers' ``AttentionInterface`` as ``VARLEN`` together with a
mask function that builds no mask for packed rows (the spans replace it) and SDPA's mask otherwise; inputs
with a mask (unpacked, padded batches), a cache, or one span per row go to ``sdpa_attention_forward``
unchanged. ``train.rewrites`` switches a CPU model whose attention is ``sdpa`` to it when ``data.packing``
is on, and back on exit.
"""

from __future__ import annotations

import torch

VARLEN = "qlorakit_varlen_sdpa"


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
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    rows = []
    for b, parts in enumerate(row_spans):
        pieces = [sdpa_attention_forward(module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                         value[b : b + 1, :, s:e], None, **kwargs, is_causal=True)[0]
                  for s, e in parts]  # each (1, e - s, H, D)
        rows.append(torch.cat(pieces, dim=1))  # (1, T, H, D)
    return torch.cat(rows, dim=0), None  # (B, T, H, D)


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
