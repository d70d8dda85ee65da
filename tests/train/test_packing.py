"""Packed rows train exactly like the same examples one by one: per-example losses, LoRA gradients, isolation."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from qlorakit.config import LoraConfig
from qlorakit.data.batching import collate
from qlorakit.data.packing import PackedDataset, collate_packed
from qlorakit.data.tokenize import IGNORE_INDEX
from qlorakit.lora import lora_layers
from qlorakit.train.loss import model_inputs, target_tokens, token_loss_sum
from qlorakit.train.packed import packing_problem
from qlorakit.train.varlen import VARLEN, register
from tests.helpers.lora import randomize_lora_b
from tests.helpers.train import tiny_qlora_model

VOCAB = 128
ROW = 16
# 20 tokens do not fit a row of 16: cut at the row end into 16 + 4, each piece trained on its own.
LENGTHS = [9, 5, 12, 3, 20, 7]


@pytest.fixture(scope="module")
def model():
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))  # fp32, NF4 base, LoRA everywhere
    randomize_lora_b(model)  # B != 0, so every A gets a gradient
    return model


def _examples() -> list[dict[str, list[int]]]:
    rng = random.Random(0)
    out = []
    for k, n in enumerate(LENGTHS):
        ids = [rng.randrange(VOCAB) for _ in range(n)]
        # even examples: loss on every token (train_on_source), odd ones: a masked prompt
        labels = list(ids) if k % 2 == 0 else [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _pad(items):
    return collate(items, pad_id=0)


def _token_losses(model, batch) -> torch.Tensor:
    """Per-position CE of ``labels[t + 1]`` from ``logits[t]`` (0 where ignored): (rows, seq - 1)."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return ce * (labels != IGNORE_INDEX)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for path, layer in lora_layers(model).items():
        for kind in ("lora_A", "lora_B"):
            grads[f"{path}.{kind}"] = getattr(layer, kind)["default"].weight.grad.detach().clone()
    return grads


@pytest.fixture(params=["sdpa", VARLEN])
def attention(request, model):
    """The model with transformers' block-diagonal mask (sdpa) or the per-span path of ``train.varlen``."""
    old = model.config._attn_implementation
    model.config._attn_implementation = register() if request.param == VARLEN else request.param
    yield request.param
    model.config._attn_implementation = old


def test_packed_batch_has_the_per_example_losses_and_lora_gradients_of_one_by_one(model, attention):
    examples = _examples()
    packed = PackedDataset(examples, ROW)
    assert packed.stats.cut_examples == 1 and len(packed) < len(LENGTHS)
    batch = collate_packed([packed[r] for r in range(len(packed))], _pad)
    pieces = [p for row in packed.rows for p in row]
    alone = [{"input_ids": examples[p.index]["input_ids"][p.start : p.stop],
              "labels": examples[p.index]["labels"][p.start : p.stop]} for p in pieces]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        per_token = _token_losses(model, batch)
        singles = [float(_token_losses(model, _pad([x])).sum()) for x in alone]
    at = 0
    for r, row in enumerate(packed.rows):
        for piece in row:
            mine = float(per_token[r, at : at + len(piece) - 1].sum())  # positions predicting within the piece
            assert mine == pytest.approx(singles[pieces.index(piece)], rel=1e-5)
            at += len(piece)
        at = 0
    # the trainer's normalization: the same target tokens, so the same token mean
    assert target_tokens(batch) == sum(target_tokens(_pad([x])) for x in alone)
    loss, _ = token_loss_sum(model, batch)  # the trainer's (chunked) loss
    loss.backward()
    packed_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for x in alone:
        single, _ = token_loss_sum(model, _pad([x]))
        single.backward()
        total += float(single.detach())
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)
    one_by_one = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    assert len(packed_grads) == 28  # 2 layers x 7 projections x (A, B)
    for name, grad in packed_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, one_by_one[name], rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


def test_a_token_of_example_two_ignores_the_tokens_of_example_one_in_its_row(model, attention):
    first = {"input_ids": list(range(10, 17)), "labels": list(range(10, 17))}
    second = {"input_ids": [5, 9, 2, 44, 7], "labels": [5, 9, 2, 44, 7]}
    changed = {"input_ids": [99, 98, 97, 96, 95, 94, 93], "labels": list(range(10, 17))}
    rows = [PackedDataset([a, second], ROW) for a in (first, changed)]
    assert all(len(ds) == 1 for ds in rows)
    with torch.no_grad():
        logits = [model(**model_inputs(collate_packed([ds[0]], _pad))).logits for ds in rows]
        unpacked = model(input_ids=torch.tensor([first["input_ids"] + second["input_ids"]])).logits
    assert [p.index for p in rows[0].rows[0]] == [0, 1]  # the second example is tokens 7..11 of the row
    torch.testing.assert_close(logits[0][:, 7:], logits[1][:, 7:], rtol=0, atol=0)  # bit-identical
    assert (logits[0][:, :7] - logits[1][:, :7]).abs().max() > 1e-2  # the first example itself did change
    assert (logits[0][:, 7:] - unpacked[:, 7:]).abs().max() > 1e-2  # and without packing it would have leaked


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_packing_check_passes_for_llama_attention(attn):
    import transformers

    from tests.helpers.tiny_llama import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(attn_implementation=attn))
    model.train()
    assert packing_problem(model) is None
    assert model.training  # the check restores the mode


class _IgnoresPositions(torch.nn.Module):
    """A causal LM that drops ``position_ids``: the packed examples run as one sequence."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=False)


class _NoPositions(_IgnoresPositions):
    def forward(self, input_ids, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=False)


def test_varlen_attention_equals_the_block_diagonal_mask(model):
    packed = PackedDataset(_examples(), ROW)
    batch = collate_packed([packed[r] for r in range(len(packed))], _pad)
    with torch.no_grad():
        masked = model(**model_inputs(batch)).logits  # transformers builds the (B, 1, T, T) block mask
        old, model.config._attn_implementation = model.config._attn_implementation, register()
        try:
            spans = model(**model_inputs(batch)).logits
            padded = _pad([packed[0], packed[1]])  # an unpacked, padded batch goes to SDPA with its mask
            plain = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        finally:
            model.config._attn_implementation = old
        reference = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(spans, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, reference, rtol=0, atol=0)


def test_the_packing_check_reports_attention_that_crosses_examples(model):
    assert "crosses packed examples" in packing_problem(_IgnoresPositions(model))
    assert "does not take packed position_ids" in packing_problem(_NoPositions(model))


def test_packed_training_resumes_exactly_and_logs_padding(smol_tokenizer, small_oasst, tmp_path):
    from qlorakit.data import build_datasets, collate_fn
    from qlorakit.train import list_checkpoints, read_metrics, train
    from tests.helpers.train import run_config

    def setup(out):
        cfg = run_config(small_oasst, out, packing=True, save_steps=1, grad_accum=1, max_steps=4)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=256))  # ~3 examples a row
        train_set, val_set, _ = build_datasets(cfg.data, smol_tokenizer)
        return cfg, tiny_qlora_model(len(smol_tokenizer), cfg.lora), train_set, val_set, collate_fn(smol_tokenizer)

    cfg, model, train_set, val_set, coll = setup(tmp_path / "full")
    train(model, train_set, val_set, coll, cfg, tmp_path / "full", progress=False)
    record = json.loads((tmp_path / "full" / "packing.json").read_text())
    assert record["enabled"] and record["rows"] < record["examples"] == len(train_set)
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert all(0 <= r["padding_fraction"] < 1 for r in rows)
    per_epoch = -(-record["rows"] // cfg.train.batch_size)
    assert per_epoch < 4  # the 4 steps cross an epoch boundary of the packed stream

    cfg, model, train_set, val_set, coll = setup(tmp_path / "cut")
    train(model, train_set, val_set, coll, cfg, tmp_path / "cut", progress=False, stop_after_steps=2)
    cfg, model, train_set, val_set, coll = setup(tmp_path / "cut")
    train(model, train_set, val_set, coll, cfg, tmp_path / "cut", resume_from=list_checkpoints(tmp_path / "cut")[-1],
          progress=False)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("full", "cut")]
    assert losses[1] == losses[0] and len(losses[0]) == 4
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "eval_loss" in r]
             for d in ("full", "cut")]
    assert evals[1] == evals[0]


def test_span_buckets_cover_each_length_with_at_most_eight_steps_an_octave():
    from qlorakit.train.varlen import SPAN_BUCKET, bucketed

    assert [bucketed(n) for n in (1, 64, 65, 511, 512, 513, 1000)] == [64, 64, 128, 512, 512, 576, 1024]
    for n in range(1, 5000):
        b = bucketed(n)
        assert n <= b and (b - n < SPAN_BUCKET or b <= 1.125 * n) and bucketed(b) == b
    assert len({bucketed(n) for n in range(1025, 2049)}) == 8  # 1152, 1280, ..., 2048


@pytest.mark.parametrize("at_row_end", [False, True])
def test_a_bucketed_span_gives_the_spans_outputs_and_gradients(at_row_end):
    """The bf16 path's bucketing (extended over the next tokens, or zero-padded at the row end) is exact: held
    to the unbucketed span in fp64, forward and the gradients of q, k and v."""
    from qlorakit.train.varlen import _span

    class Attn(torch.nn.Module):
        is_causal, num_key_value_groups, training = True, 3, False

    torch.manual_seed(0)
    T, s, e = 200, (130 if at_row_end else 10), (200 if at_row_end else 85)  # 70 / 75 tokens -> buckets of 128
    qkv = [torch.randn(1, h, T, 16, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2)]
    weight = torch.randn(1, e - s, 6, 16, dtype=torch.float64)
    outs, grads = [], []
    for bucket in (False, True):
        out, _ = _span(Attn(), *qkv, 0, s, e, bucket, scaling=0.25, dropout=0.0)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in qkv])
        for t in qkv:
            t.grad = None
    assert outs[0].shape == (1, e - s, 6, 16)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
