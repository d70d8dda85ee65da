"""Next-token cross-entropy over the target tokens, without holding every logit and its gradient at once.

For hidden states ``h_t`` (the decoder's last layer, after the final norm), the head ``W: (V, H)`` and the
target token ``y_t`` of every position whose shifted label is not ``IGNORE_INDEX``:

    L = sum_t  CE(z_t, y_t),   z_t = h_t W^T (V,),   CE(z, y) = logsumexp(z) - z_y

- ``reference_loss_sum``: the model's full logits ``(B, T, V)``, cast to fp32, ``F.cross_entropy(sum)``.
  For SmolLM2 (V = 49,152) at 4 x 512 tokens that is 400 MB of fp32 logits, plus log-probabilities and
  their gradient of the same size, mostly for prompt tokens that carry no loss.
- ``chunked_loss_sum``: the decoder's hidden states, only the ``N`` target rows of them, and an autograd
  function over chunks of ``C`` rows. Per chunk ``c`` (``z_c = h_c W^T`` in the compute dtype, then fp32):

      loss_c   = sum_rows(logsumexp(z_c) - z_c[y])
      dL/dz_c  = softmax(z_c) - onehot(y)                    (fp32, cast to the compute dtype)
      dL/dh_c  = dL/dz_c @ W                                 (C, H)
      dL/dW   += dL/dz_c^T @ h_c                             (V, H), only when the head trains

  The gradients are formed in forward (no second head matmul) and scaled by the incoming gradient of
  the loss sum in backward. Peak extra memory: a few ``C x V`` fp32 blocks instead of several
  ``B x T x V``; head FLOPs: ``N`` rows instead of ``B x T``.

The two agree to fp32 rounding (tests hold loss and gradients to ``rtol 1e-5``): the chunked sum adds
per-chunk partial sums, and it scales ``dL/dh`` after the matmul rather than before.

In 16-bit the last, partial chunk is zero-padded to a multiple of ``LAST_CHUNK_STEP`` rows and only its
first rows are used: oneDNN keeps a primitive (about 1 MiB for SmolLM2's head) for every matmul shape it
meets, and the number of target rows, so the last chunk's height, changes every step (measured: 100 random
heights kept 95 MiB). Each row's logits are a dot product over ``H`` whatever the other rows, so the padding
rows change nothing that is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.constants import LOSS_CHUNK_TOKENS

IGNORE_INDEX = -100
#: 16-bit: the last chunk's rows are padded to a multiple of this (module docstring).
LAST_CHUNK_STEP = 64

#: Config attributes of models whose head does more than ``h W^T`` (soft-capping, scaling): never chunked.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The model's keyword inputs: ids and the padding mask, or, for packed rows (``data.packing``), ids and
    ``position_ids`` without a mask (the model separates the packed examples from the positions; no cache)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens from the full logits, and their count."""
    logits = model(**model_inputs(batch)).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def chunkable_head(model) -> nn.Linear | None:
    """The plain ``nn.Linear`` head of a causal LM whose logits are exactly ``h W^T``; ``None`` otherwise."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or head.bias is not None or getattr(model, "base_model", model) is model:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def _padded(rows: torch.Tensor, extra: int) -> torch.Tensor:
    """``rows`` (C, K) with ``extra`` zero rows after them: (C + extra, K); itself when ``extra`` is 0."""
    return F.pad(rows, (0, 0, 0, extra)) if extra else rows


class _ChunkedLinearCE(torch.autograd.Function):
    """``sum_t CE(h_t W^T, y_t)`` over row chunks; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        # hidden: (N, H), weight: (V, H), labels: (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # (V, H)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        pad_last = weight.dtype in (torch.bfloat16, torch.float16)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]  # (C, H), (C,)
            rows = h.shape[0]
            extra = (-rows) % LAST_CHUNK_STEP if pad_last and rows < chunk else 0  # the last chunk's height, bucketed
            z = (_padded(h, extra) @ weight.t())[:rows].float()  # (C, V)
            lse = torch.logsumexp(z, dim=1)  # (C,)
            total += (lse - z.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            if want_h or want_w:
                dz = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of z: (C, V)
                dz[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                dz = dz.to(weight.dtype)
                if want_h:
                    grad_h[start : start + chunk] = (_padded(dz, extra) @ weight)[:rows]  # (C, H)
                if want_w:
                    grad_w += (dz.t() @ h).float()  # (V, H)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """``sum_t CE(hidden_t @ weight.T, labels_t)`` (fp32 scalar) over ``chunk_tokens`` rows at a time.

    ``hidden (N, H)``, ``weight (V, H)``, ``labels (N,)`` all valid class indices (filter ignored rows first).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk_tokens)


def chunked_loss_sum(
    model, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """``reference_loss_sum`` from the decoder's hidden states, target rows only, ``chunk_tokens`` at a time.

    Falls back to ``reference_loss_sum`` for a model without a plain linear head (see ``chunkable_head``).
    """
    head = chunkable_head(model)
    if head is None:
        return reference_loss_sum(model, batch)
    out = model.base_model(**model_inputs(batch))
    hidden = out.last_hidden_state[:, :-1, :]  # (B, T-1, H)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    keep = labels != IGNORE_INDEX  # (B, T-1)
    rows = hidden[keep]  # (N, H)
    loss = chunked_linear_cross_entropy(rows, head.weight, labels[keep], chunk_tokens)
    return loss, int(keep.sum())


def token_loss_sum(
    model, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens, and their count (the module docstring).

    ``chunk_tokens`` > 0: the head and the loss run over target rows only, that many at a time
    (``chunked_loss_sum``); 0: the full-logits reference (``reference_loss_sum``).
    """
    if chunk_tokens > 0:
        return chunked_loss_sum(model, batch, chunk_tokens)
    return reference_loss_sum(model, batch)


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
