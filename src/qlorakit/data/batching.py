"""Batches: right-padding collate and a resumable, length-grouped batch order.

``batch_order(lengths, batch_size, seed, epoch, group_by_length)`` is a pure function of its inputs, so
a trainer that saved ``(epoch, batch index)`` resumes exactly where it stopped by recomputing the
epoch's order. With ``group_by_length`` it groups like transformers' ``LengthGroupedSampler``: a
seeded permutation is cut into mega-batches of ``50 * batch_size`` (fewer for small data, so there
are at least 4), each mega-batch is sorted by length (longest first) and cut into batches, which
keeps padding low while the batch contents stay random. Unlike that sampler the batches are then
shuffled (seed + epoch), and the batch holding the longest example goes first, so an out-of-memory
failure shows at step one. Without grouping, the order is a plain seeded permutation in batches.
Every index appears exactly once per epoch; at most one batch (the end of the data) is smaller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from qlorakit.data.tokenize import IGNORE_INDEX
from qlorakit.errors import DataError

MEGA_BATCH_MULT = 50
Batch = dict[str, torch.Tensor]


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; deterministic in all arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    rng = np.random.default_rng([seed % 2**63, epoch % 2**63, 0x514C6F5241])  # "QLoRA"
    perm = [int(i) for i in rng.permutation(n)]
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    mega = batch_size * max(min(n // (batch_size * 4), MEGA_BATCH_MULT), 1)
    batches = []
    for start in range(0, n, mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [batches[int(i)] for i in rng.permutation(len(batches))]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> Batch:
    """Right-pad ``input_ids`` with ``pad_id``, ``labels`` with -100; ``attention_mask`` 1 on real tokens."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(x["input_ids"]) for x in examples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (batch, seq)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]), dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out of attention and loss)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")


def collate_fn(tokenizer: Any, pad_to_multiple_of: int = 1) -> Callable[[Sequence[Mapping[str, Sequence[int]]]], Batch]:
    """``collate`` bound to the tokenizer's pad id."""
    return partial(collate, pad_id=pad_id_of(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
