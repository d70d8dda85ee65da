"""Scoring helpers shared by the evaluations: decoder hidden states, output-head logits, a reusable prefix cache.

A causal LM computes ``logits = head(norm(decoder(x)))``; evaluations need the logits at a few positions
only (MMLU: each prompt's last real token; perplexity: the scored tokens), so they run the decoder
(``model.get_decoder()``, which ends in the final norm) and apply the output embedding to the selected
rows, ``logits = h @ W_out.T`` (+ ``tanh`` soft-capping where the config asks for it, as Gemma-2 does).
This avoids the ``(batch, seq, vocab)`` logits tensor (200 MB per 1,024 tokens for a 49k vocabulary).

Prefix reuse: every MMLU question of a subject starts with the same few-shot text. Its keys/values are
computed once (``prefix_cache``) and, per batch, broadcast to the batch (``expand_cache``) so that only
each question's own tokens are run. Attention of a suffix token at absolute position ``P + j`` over the
cached prefix is the same computation as in the full prompt, so the result equals the full forward to
floating-point reordering (the tests hold it to 1e-4 in fp32).
"""

from __future__ import annotations

from typing import Any

import torch


def decoder_hidden(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past: Any = None,
) -> tuple[torch.Tensor, Any]:
    """Final-norm hidden states ``(batch, seq, hidden)`` and the updated cache (``past`` or None)."""
    out = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past, use_cache=past is not None,
    )
    return out.last_hidden_state, out.past_key_values if past is not None else None


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Output-head logits of ``hidden`` (..., hidden) -> (..., vocab), in fp32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prefix_cache(model: Any, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``(1, kv_heads, P, head_dim)`` of every layer for ``prefix_ids`` (P >= 1 tokens)."""
    from transformers import DynamicCache

    device = model.get_output_embeddings().weight.device
    ids = torch.tensor([prefix_ids], dtype=torch.long, device=device)  # (1, P)
    _, cache = decoder_hidden(model, ids, past=DynamicCache(config=model.config))
    return [(layer.keys, layer.values) for layer in cache.layers]


def expand_cache(model: Any, layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Any:
    """A fresh ``DynamicCache`` holding the prefix for ``batch`` rows (views; the forward appends copies)."""
    from transformers import DynamicCache

    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in layers]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def pad_suffixes(
    suffixes: list[list[int]], prefix_len: int, pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch token lists that follow a ``prefix_len``-token cache, padded on ``side`` ("left"/"right").

    Returns ``input_ids (B, S)``, ``attention_mask (B, P + S)``, ``position_ids (B, S)`` (each row's real
    tokens at ``P, P+1, ...``) and ``last (B,)``, the column of each row's last real token.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: use 'left' or 'right'")
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, tokens in enumerate(suffixes):
        cols = slice(0, len(tokens)) if side == "right" else slice(width - len(tokens), width)
        ids[row, cols] = torch.tensor(tokens, dtype=torch.long)
        real[row, cols] = 1
    positions = prefix_len + (real.cumsum(dim=1) - 1).clamp(min=0)  # (B, S)
    mask = torch.cat([torch.ones((len(suffixes), prefix_len), dtype=torch.long), real], dim=1)  # (B, P + S)
    last = torch.tensor([len(s) - 1 if side == "right" else width - 1 for s in suffixes], dtype=torch.long)
    return ids.to(device), mask.to(device), positions.to(device), last.to(device)
