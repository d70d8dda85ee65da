"""The chunked head + cross-entropy equals the full-logits reference (loss and every gradient).

Tolerance: fp32, ``rtol 1e-5`` — the chunked path sums per-chunk partial sums and scales ``dL/dh`` after
the head matmul instead of before it; both are reorderings of fp32 arithmetic (relative error ~1e-7 per
operation), far below any difference a wrong gradient (a missing row, a wrong sign, an unscaled term) makes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from qlorakit.config import LoraConfig
from qlorakit.train.loss import (
    IGNORE_INDEX,
    chunkable_head,
    chunked_linear_cross_entropy,
    chunked_loss_sum,
    reference_loss_sum,
)
from tests.helpers.tiny_llama import tiny_llama_config
from tests.helpers.train import tiny_qlora_model

RTOL, ATOL = 1e-5, 1e-6
VOCAB = 96


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompt tokens carry no loss
    labels[2, 12:] = IGNORE_INDEX  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_linear_ce_matches_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (23,))
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    (ref * 0.37).backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk)
    (got * 0.37).backward()
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(weight.grad, ref_w, rtol=RTOL, atol=ATOL)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(12, 8)
    chunked_linear_cross_entropy(hidden, weight, torch.randint(0, 12, (7,)), 3).backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [4, 1024])
def test_chunked_loss_sum_matches_reference_on_a_qlora_model(chunk):
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))
    for p in model.parameters():  # nonzero B so every LoRA gradient is exercised
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch()
    ref, n_ref = reference_loss_sum(model, batch)
    (ref / n_ref).backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got, n_got = chunked_loss_sum(model, batch, chunk)
    (got / n_got).backward()
    assert n_got == n_ref == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    got_grads = _grads(model)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) == 2 * 7 * 2
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def test_chunked_loss_sum_without_grad_equals_reference():
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        ref, _ = reference_loss_sum(model, _batch(3))
        got, _ = chunked_loss_sum(model, _batch(3), 7)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_head_with_logit_scaling_is_not_chunked():
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1)
    model = transformers.LlamaForCausalLM(config)
    assert chunkable_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert chunkable_head(model) is None


@pytest.mark.parametrize("n", [1, 63, 64, 130, 256 + 5])
def test_16bit_padding_of_the_last_chunk_changes_no_kept_value(n, monkeypatch):
    """bf16: the last chunk runs at a height padded to LAST_CHUNK_STEP rows; loss and dL/dh equal those of the
    unpadded chunks (the padding switched off by a step of 1) exactly."""
    from qlorakit.train import loss as loss_module

    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(100, 32, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 100, (n,), generator=g)
    results = []
    for step in (loss_module.LAST_CHUNK_STEP, 1):
        monkeypatch.setattr(loss_module, "LAST_CHUNK_STEP", step)
        total = loss_module.chunked_linear_cross_entropy(hidden, weight, labels, 256)
        (grad,) = torch.autograd.grad(total, hidden)
        results.append((total, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
