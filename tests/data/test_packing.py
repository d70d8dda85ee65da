"""Packed rows: every token placed once, rows within their length, positions restart, labels per piece."""

from __future__ import annotations

import random

import pytest
import torch

from qlorakit.data.batching import batch_order, collate
from qlorakit.data.packing import (
    PackedDataset,
    collate_packed,
    pack_rows,
    padding_fraction,
    real_tokens,
)
from qlorakit.data.tokenize import IGNORE_INDEX


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 100) for _ in range(n)]
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_rows_places_every_token_once_within_the_row_length():
    rng = random.Random(1)
    lengths = [rng.randrange(1, 40) for _ in range(200)]
    rows = pack_rows(lengths, 48)
    assert all(sum(len(p) for p in row) <= 48 for row in rows)
    covered = sorted((p.index, p.start, p.stop) for row in rows for p in row)
    assert covered == sorted((i, 0, n) for i, n in enumerate(lengths))
    # best-fit decreasing uses at most 11/9 OPT + 1 rows; OPT >= the token bound and >= the examples over half a row
    optimum_at_least = max(-(-sum(lengths) // 48), sum(1 for n in lengths if n > 24))
    assert len(rows) <= 11 / 9 * optimum_at_least + 1


def test_pack_rows_is_deterministic_and_ignores_nothing_but_lengths():
    lengths = [5, 9, 3, 9, 12, 1, 7]
    assert pack_rows(lengths, 16) == pack_rows(list(lengths), 16)


def test_example_longer_than_a_row_is_cut_at_the_row_end_into_pieces():
    rows = pack_rows([10, 23, 3], 8)
    pieces = sorted((p.index, p.start, p.stop) for row in rows for p in row)
    # 23 tokens -> 8 + 8 + 7; a 1-token tail would be dropped (25 -> 8 + 8 + 8)
    assert pieces == [(0, 0, 8), (0, 8, 10), (1, 0, 8), (1, 8, 16), (1, 16, 23), (2, 0, 3)]
    assert sorted((p.index, p.start, p.stop) for row in pack_rows([17], 8) for p in row) == [(0, 0, 8), (0, 8, 16)]


def test_packed_row_restarts_positions_and_masks_each_first_label():
    examples = _examples([6, 4, 11])
    ds = PackedDataset(examples, 12)
    for r in range(len(ds)):
        row = ds[r]
        at = 0
        for piece in ds.rows[r]:
            example = examples[piece.index]
            n = len(piece)
            assert row["input_ids"][at : at + n] == example["input_ids"][piece.start : piece.stop]
            assert row["position_ids"][at : at + n] == list(range(n))
            assert row["labels"][at] == IGNORE_INDEX
            assert row["labels"][at + 1 : at + n] == example["labels"][piece.start + 1 : piece.stop]
            at += n
        assert at == len(row["input_ids"]) == ds.lengths[r]


def test_collate_packed_pads_with_continuing_positions_and_counts_real_tokens():
    ds = PackedDataset(_examples([7, 3, 5]), 8)
    rows = [ds[r] for r in range(len(ds))]
    batch = collate_packed(rows, lambda items: collate(items, pad_id=0))
    assert "attention_mask" not in batch
    assert real_tokens(batch) == 15
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        last = row["position_ids"][-1]
        expected = row["position_ids"] + list(range(last + 1, last + 1 + batch["input_ids"].shape[1] - n))
        assert batch["position_ids"][r].tolist() == expected
        assert batch["token_mask"][r].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][r, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("group_by_length", [True, False])
def test_packing_lowers_padding_of_mixed_lengths(group_by_length):
    rng = random.Random(3)
    lengths = [rng.randrange(10, 200) for _ in range(300)]
    before = padding_fraction(lengths, batch_order(lengths, 4, 0, 0, group_by_length))
    ds = PackedDataset(_examples(lengths), 256)
    after = padding_fraction(ds.lengths, batch_order(ds.lengths, 4, 0, 0, group_by_length))
    assert sum(ds.lengths) == sum(lengths)
    assert after < before
    assert padding_fraction([3, 5], [[0, 1]]) == pytest.approx(0.2)
    assert torch.is_tensor(collate_packed([ds[0]], lambda items: collate(items, pad_id=0))["position_ids"])
