"""Padding-free packing: tokenized examples laid out in rows of ``row_len`` tokens, each example on its own.

A row is a concatenation of pieces ``x_1 ; x_2 ; ... ; x_k`` with ``sum |x_j| <= row_len``. Every piece keeps
its own token positions ``0 .. |x_j| - 1`` (``position_ids``), so a model whose attention separates the
sequences that the positions mark (transformers' packed-sequence detection for sdpa / eager / flash
attention; checked at run time by ``qlorakit.train.packed``) computes for every token of ``x_j`` exactly
what it computes for ``x_j`` alone: causal attention within the piece, none across pieces.

Labels are unchanged per piece except its FIRST label, which becomes ``IGNORE_INDEX``: the shifted loss
``CE(logits_t, label_{t+1})`` would otherwise train the last token of ``x_{j-1}`` to predict the first
token of ``x_j``, a target that the example run alone never has. So the loss of a packed row is the sum of
its pieces' own losses, and the trainer's mean over the step's target tokens is unchanged.

Layout (``pack_rows``), best-fit decreasing: pieces sorted longest first (ties by example index), each
placed in the open row whose free space is the smallest that still holds it, else in a new row. The rows
depend only on the lengths and ``row_len`` (no seed), so a resumed run rebuilds the same rows; the trainer
orders them per epoch with ``batch_order`` like examples. An example longer than a row (a ``text`` block
longer than ``max_seq_len``; conversations are already truncated to it) is cut at the row end into pieces
of ``row_len`` tokens (the last one shorter), each packed as an example of its own; a last piece of one
token has nothing to predict and is dropped. Tokens are never dropped otherwise.

``collate_packed`` pads rows to the longest row of the batch with the unpacked ``collate`` (pad id,
``IGNORE_INDEX``); the padding continues the last piece's positions, so it joins the last sequence, which
never attends to it (causal), and carries no loss. The batch has ``token_mask`` (1 on real tokens, for the
token counts) instead of ``attention_mask``: the model gets ``position_ids`` and no mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from qlorakit.data.tokenize import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Piece:
    """Tokens ``start:stop`` of example ``index`` (the whole example unless it was cut at a row end)."""

    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def split_long(lengths: Sequence[int], row_len: int) -> list[Piece]:
    """Every example as one piece, or, when longer than ``row_len``, as row-length pieces (a 1-token tail dropped)."""
    if row_len < 2:
        raise ValueError(f"row_len must be >= 2, got {row_len}")
    pieces = []
    for index, n in enumerate(lengths):
        for start in range(0, n, row_len):
            stop = min(start + row_len, n)
            if stop - start >= 2 or start == 0:
                pieces.append(Piece(index, start, stop))
    return pieces


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[Piece]]:
    """Rows of pieces, best-fit decreasing (see the module docstring); deterministic in its arguments."""
    pieces = sorted(split_long(lengths, row_len), key=lambda p: (-len(p), p.index, p.start))
    rows: list[list[Piece]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    for piece in pieces:
        at = bisect.bisect_left(free, (len(piece), -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = row_len, len(rows)
            rows.append([])
        rows[row].append(piece)
        if space - len(piece) > 0:
            bisect.insort(free, (space - len(piece), row))
    return rows


@dataclass(frozen=True)
class PackingStats:
    """What packing did: examples in, pieces and rows out, examples cut at a row end."""

    examples: int
    rows: int
    row_len: int
    tokens: int
    cut_examples: int

    @property
    def fill(self) -> float:
        """Real tokens per row slot when every row is ``row_len`` long."""
        return self.tokens / max(self.rows * self.row_len, 1)


class PackedDataset(Sequence[dict[str, list[int]]]):
    """Packed rows of ``examples`` (items with ``input_ids`` and ``labels``); ``ds[r]`` adds ``position_ids``."""

    def __init__(self, examples: Sequence[Mapping[str, Sequence[int]]], row_len: int) -> None:
        self.examples, self.row_len = examples, row_len
        self.example_lengths = [len(x["input_ids"]) for x in examples]
        self.rows = pack_rows(self.example_lengths, row_len)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> dict[str, list[int]]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, list[int]]]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for piece in self.rows[index]:
            example = self.examples[piece.index]
            piece_labels = list(example.get("labels", example["input_ids"])[piece.start : piece.stop])
            piece_labels[0] = IGNORE_INDEX  # never predicted from the previous piece (module docstring)
            ids += list(example["input_ids"][piece.start : piece.stop])
            labels += piece_labels
            positions += range(len(piece))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    @property
    def lengths(self) -> list[int]:
        return [sum(len(p) for p in row) for row in self.rows]

    @property
    def stats(self) -> PackingStats:
        cut = sum(1 for n in self.example_lengths if n > self.row_len)
        return PackingStats(examples=len(self.examples), rows=len(self.rows), row_len=self.row_len,
                            tokens=sum(self.lengths), cut_examples=cut)


def collate_packed(rows: Sequence[Mapping[str, Sequence[int]]], collate: Callable[[Sequence[Mapping]], Batch]) -> Batch:
    """``collate`` of the rows (padding and labels), plus ``position_ids``; ``attention_mask`` -> ``token_mask``."""
    batch = collate(rows)
    width = batch["input_ids"].shape[1]
    positions = torch.empty((len(rows), width), dtype=torch.long)  # (rows, seq)
    for r, row in enumerate(rows):
        n = len(row["position_ids"])
        positions[r, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
        last = int(row["position_ids"][-1]) if n else -1
        positions[r, n:] = torch.arange(last + 1, last + 1 + width - n)  # padding continues the last piece
    batch["position_ids"] = positions
    batch["token_mask"] = batch.pop("attention_mask")
    return batch


def real_tokens(batch: Batch) -> int:
    """Non-padding tokens of a batch, packed (``token_mask``) or not (``attention_mask``)."""
    mask = batch["token_mask"] if "token_mask" in batch else batch["attention_mask"]
    return int(mask.sum())


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the slots of right-padded batches (each as wide as its longest item) that are padding."""
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0
