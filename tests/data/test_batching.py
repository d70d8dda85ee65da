"""Batch order (pure, resumable, length-grouped) and the right-padding collate."""

from __future__ import annotations

import random
import statistics

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlorakit.data import batch_order, collate, collate_fn

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(5, 1000) for _ in range(1000)]


def spread(lengths, batches):
    """Mean over batches of (max - min) length inside the batch."""
    return statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)


def test_order_is_a_pure_function_of_its_arguments():
    for group in (True, False):
        assert batch_order(LENGTHS, 8, seed=1, epoch=3, group_by_length=group) == batch_order(LENGTHS, 8, 1, 3, group)


def test_resume_mid_epoch_continues_the_same_batches():
    order = batch_order(LENGTHS, 8, seed=1, epoch=2)
    assert batch_order(list(LENGTHS), 8, 1, 2)[57:] == order[57:]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 4096), min_size=0, max_size=300), batch_size=st.integers(1, 17),
       seed=st.integers(-(2**40), 2**40), epoch=st.integers(0, 50), group=st.booleans())
def test_every_index_once_per_epoch(lengths, batch_size, seed, epoch, group):
    batches = batch_order(lengths, batch_size, seed, epoch, group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1


def test_epochs_and_seeds_give_different_orders():
    for group in (True, False):
        assert batch_order(LENGTHS, 8, 1, 0, group) != batch_order(LENGTHS, 8, 1, 1, group)
        assert batch_order(LENGTHS, 8, 1, 0, group) != batch_order(LENGTHS, 8, 2, 0, group)


def test_grouping_puts_similar_lengths_together():
    grouped = spread(LENGTHS, batch_order(LENGTHS, 8, 1, 0, True))
    shuffled = spread(LENGTHS, batch_order(LENGTHS, 8, 1, 0, False))
    assert shuffled > 500  # uniform lengths in [5, 1000]: about 7/9 of the range per batch of 8
    assert grouped < shuffled / 10


def test_grouped_order_starts_with_the_longest_example():
    first = batch_order(LENGTHS, 8, 1, 4, True)[0]
    assert max(LENGTHS[i] for i in first) == max(LENGTHS)


def test_grouped_batches_are_not_in_length_order():
    maxima = [max(LENGTHS[i] for i in b) for b in batch_order(LENGTHS, 8, 1, 0, True)]
    assert maxima[1:] != sorted(maxima[1:], reverse=True)


def test_collate_pads_right_and_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_fn_uses_the_tokenizer_pad_id(tok):
    batch = collate_fn(tok, pad_to_multiple_of=4)([{"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, tok.pad_token_id, tok.pad_token_id, tok.pad_token_id]]
    assert tok.pad_token_id == 2
