"""Preference objectives on (prompt x, chosen y_w, rejected y_l) pairs: DPO and ORPO.

Sequence log-probabilities over the completion tokens only (labels != IGNORE_INDEX, shifted by one):

    log pi(y | x) = sum_t log softmax(z_t)[y_t]                         (``logps``, per row)
    avg log pi    = log pi(y | x) / |y|                                 (``logps / counts``)

**DPO** (Rafailov et al. 2023, eq. 7; TRL's ``loss_type="sigmoid"``), with the reference ``pi_ref`` = the same
4-bit base with the adapters switched off (``lora.disable_adapters``), so no second model is held:

    h       = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    L_DPO   = mean_pairs  -log sigmoid(beta * h)
    r_w     = beta * (log pi(y_w|x) - log pi_ref(y_w|x)),   r_l likewise          (``rewards/chosen|rejected``)
    dL/dh   = -beta * sigmoid(-beta * h) / n_pairs

**ORPO** (Hong et al. 2024, eqs. 4-7; TRL's ``odds_ratio_loss``), no reference, ``p = exp(avg log pi)``:

    log odds(y|x) = avg log pi(y|x) - log(1 - exp(avg log pi(y|x)))
    L_OR          = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
    L_ORPO        = NLL(y_w) + lambda * mean_pairs L_OR
    r_w = lambda * avg log pi(y_w|x),  r_l likewise                          (``rewards/chosen|rejected``)

NLL(y_w) is the token-mean cross-entropy of the chosen completions over the whole step. TRL's ORPOTrainer takes
it over prompt and completion tokens; here it covers the completion only, like the SFT loss. ``log(1 - e^a)`` is
computed stably: ``log(-expm1(a))`` for ``a > -ln 2``, ``log1p(-exp(a))`` below.

Metrics carry TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (r_w > r_l),
``rewards/margins`` (r_w - r_l), ``logps/chosen``, ``logps/rejected``, and for ORPO ``nll_loss``,
``log_odds_ratio`` (mean log sigmoid of the log-odds difference) and ``log_odds_chosen`` (its mean argument);
means over the pairs of a step, ``eval_``-prefixed over the held-out pairs.

A micro-batch is one padded batch of 2B rows, chosen first (``data.pairs.collate_pairs``). The step's loss is the
mean over ALL pairs of its accumulated micro-batches: each micro-batch backpropagates its share.

Per-token log-probs: ``token_logps`` runs the head over the target rows only, ``chunk`` rows at a time, in an
autograd function that forms ``d log p_t / d h_t = (onehot(y_t) - softmax(z_t)) W`` in forward (the head is
frozen, so only the hidden states need a gradient); ``reference_token_logps`` is the full-logits reference
(``log_softmax`` + ``gather``). Tests hold one to the other and the losses to a float64 re-implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qlorakit.train.loss import IGNORE_INDEX, chunkable_head

LN2 = math.log(2.0)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, without cancellation on either side of ``-ln 2``."""
    return torch.where(a > -LN2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO sigmoid losses and the (detached) rewards; every input: (B,) summed log-probs."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    losses = -F.logsigmoid(beta * h)  # (B,)
    return losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def odds_ratio_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``lambda * L_OR``, the log-odds difference and the rewards; inputs: (B,) mean log-probs (< 0)."""
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))  # (B,)
    losses = -beta * F.logsigmoid(log_odds)  # (B,)
    return losses, log_odds, (beta * avg_chosen).detach(), (beta * avg_rejected).detach()


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(h_t W^T)[y_t]`` per row, over row chunks, for a frozen ``W``; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        # hidden: (N, H), weight: (V, H), labels: (N,)
        want_h = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if want_h else None  # (N, H): d logp_t / d h_t
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]  # (C, H), (C,)
            z = (h @ weight.t()).float()  # (C, V)
            lse = torch.logsumexp(z, dim=1)  # (C,)
            out[start : start + chunk] = z.gather(1, y.unsqueeze(1)).squeeze(1) - lse
            if want_h:
                dz = z.sub_(lse.unsqueeze(1)).exp_().neg_()  # -softmax, in place of z: (C, V)
                dz[torch.arange(y.shape[0], device=y.device), y] += 1.0
                grad_h[start : start + chunk] = dz.to(weight.dtype) @ weight  # (C, H)
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        gh = grad_h * grad_out.unsqueeze(1).to(grad_h.dtype) if grad_h is not None else None  # (N, H)
        return gh, None, None, None


def reference_token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target token (N,), its row (N,)) from the full logits: the slow, obviously right path."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (R, T, V)
    labels = batch["labels"][:, 1:]  # (R, T-1)
    keep = labels != IGNORE_INDEX  # (R, T-1)
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (R, T-1, V)
    token = logp.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)  # (R, T-1)
    return token[keep], keep.nonzero()[:, 0]


def token_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_token_logps`` from the hidden states, target rows only, ``chunk_tokens`` rows at a time.

    Falls back to the reference for ``chunk_tokens`` 0, a head that is not a plain linear, or a trainable head.
    """
    head = chunkable_head(model)
    if chunk_tokens < 1 or head is None or head.weight.requires_grad:
        return reference_token_logps(model, batch)
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state[:, :-1, :]  # (R, T-1, H)
    labels = batch["labels"][:, 1:]  # (R, T-1)
    keep = labels != IGNORE_INDEX  # (R, T-1)
    return _ChunkedTokenLogps.apply(hidden[keep], head.weight, labels[keep], chunk_tokens), keep.nonzero()[:, 0]


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-prob per row (R,), completion tokens per row (R,))."""
    rows = batch["input_ids"].shape[0]
    values, row_of = token_logps(model, batch, chunk_tokens)  # (N,), (N,)
    sums = torch.zeros(rows, dtype=torch.float32, device=values.device).index_add(0, row_of, values)  # (R,)
    counts = torch.bincount(row_of, minlength=rows)  # (R,)
    return sums, counts
