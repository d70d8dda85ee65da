"""Build the training and validation sets from a DataConfig: read, validate, tokenize, split, summarize.

``build_datasets(cfg, tokenizer)`` reads and validates every file first (a malformed row fails before
anything is tokenized), renders and tokenizes the conversations, packs the text documents into blocks,
then holds out ``val_size`` items (a fraction < 1, rounded up, or a count >= 1) chosen by a seeded
permutation: the split depends only on the data and ``cfg.seed``, and train and validation are
disjoint. Both keep the original order. The bundled OASST1 sample (``default_sample_path()``) is the
default training data of ``qlorakit train``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, overload

import numpy as np

from qlorakit.config import DataConfig
from qlorakit.data.formats import load_examples
from qlorakit.data.schema import Conversion
from qlorakit.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    TruncationStats,
    pack_documents,
    tokenize_conversations,
)
from qlorakit.errors import DataError

SAMPLE_NAME = "oasst1_sample.jsonl"


def default_sample_path() -> Path:
    """The OASST1 sample shipped inside the package (see ``data/samples/README.md``)."""
    path = Path(str(resources.files("qlorakit.data") / "samples" / SAMPLE_NAME))
    if not path.is_file():
        raise DataError(f"the bundled sample {path} is missing; reinstall qlorakit")
    return path


class TokenizedDataset(Sequence[dict[str, list[int]]]):
    """Tokenized examples; ``ds[i]`` is ``{"input_ids": [...], "labels": [...]}``."""

    def __init__(self, items: Sequence[TokenizedExample]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> dict[str, list[int]]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, list[int]]]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self.items[index]
        return {"input_ids": item.input_ids, "labels": item.labels}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        return [len(item.input_ids) for item in self.items]

    def origin(self, index: int) -> str:
        """``<file>:<row>`` the example came from (for a packed block: where the block starts)."""
        return self.items[index].origin


@dataclass
class DataSummary:
    """What was read and built: per-file formats and counts, tokens, truncation and drops."""

    files: list[tuple[str, str, int, int]]  # (path, format, rows, examples)
    examples: int
    train_examples: int
    val_examples: int
    tokens: int
    target_tokens: int
    max_length: int
    truncation: TruncationStats
    documents: int = 0
    blocks: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def truncated_examples(self) -> int:
        return self.truncation.examples

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for a run's records)."""
        values = dataclasses.asdict(self)
        values["files"] = [dict(zip(("path", "format", "rows", "examples"), f, strict=True)) for f in self.files]
        return values

    def format(self) -> str:
        """A short text summary for the console."""
        t = self.truncation
        split = f"{self.train_examples:,} train / {self.val_examples:,} held out"
        lines = [f"data       {self.examples:,} examples ({split})"]
        for path, fmt, rows, examples in self.files:
            lines.append(f"  {path}: {fmt}, {rows:,} rows -> {examples:,} examples")
        if self.blocks:
            lines.append(f"  text: {self.documents:,} documents packed into {self.blocks:,} blocks")
        share = 100.0 * self.target_tokens / max(self.tokens, 1)
        lines.append(f"tokens     {self.tokens:,} ({self.target_tokens:,} with loss, {share:.1f}%), "
                     f"mean {self.tokens / max(self.examples, 1):.0f}, max {self.max_length:,} per example")
        lines.append(f"truncated  {t.examples:,} examples: source {t.source_examples:,} ({t.source_tokens:,} tokens), "
                     f"target {t.target_examples:,} ({t.target_tokens:,} tokens)")
        if self.dropped:
            lines.append("dropped    " + "; ".join(f"{n:,} x {why}" for why, n in sorted(self.dropped.items())))
        return "\n".join(lines)


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices, each sorted: ``val_size`` < 1 is a fraction (rounded up), >= 1 a count."""
    if val_size <= 0:
        return list(range(n)), []
    n_val = math.ceil(n * val_size) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise DataError(f"val_size = {val_size} holds out {n_val} of {n} examples and leaves none for training; "
                        "use a smaller fraction or count")
    rng = np.random.default_rng([seed % 2**63, 0x76616C])  # "val"
    held = sorted(int(i) for i in rng.permutation(n)[:n_val])
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[TokenizedDataset, TokenizedDataset, DataSummary]:
    """Train and validation sets and their summary (see the module docstring)."""
    conversions = load_examples(cfg.paths, cfg.format)
    for c in conversions:
        if c.format == "preference":
            raise DataError(f"{c.path}: preference pairs (prompt, chosen, rejected) train with --method dpo or orpo; "
                            "supervised fine-tuning needs one answer per prompt")
    conversations = [ex for c in conversions for ex in c.examples if not ex.is_text]
    documents = [ex for c in conversions for ex in c.examples if ex.is_text]
    items, truncation, dropped = tokenize_conversations(conversations, tokenizer, cfg)
    blocks = pack_documents(documents, tokenizer, cfg.block_size) if documents else []
    items += blocks
    if not items:
        raise DataError(f"no training examples in {', '.join(cfg.paths)} (every row was dropped: {dropped})")
    train_idx, val_idx = split_indices(len(items), cfg.val_size, cfg.seed)
    summary = _summarize(conversions, items, len(val_idx), truncation, dropped, (len(documents), len(blocks)))
    return TokenizedDataset([items[i] for i in train_idx]), TokenizedDataset([items[i] for i in val_idx]), summary


def _summarize(
    conversions: list[Conversion], items: list[TokenizedExample], n_val: int, truncation: TruncationStats,
    dropped: dict[str, int], packed: tuple[int, int],
) -> DataSummary:
    all_dropped = dict(dropped)
    formats: dict[str, int] = {}
    for c in conversions:
        formats[c.format] = formats.get(c.format, 0) + len(c.examples)
        for why, n in c.dropped.items():
            all_dropped[why] = all_dropped.get(why, 0) + n
    return DataSummary(
        files=[(c.path, c.format, c.rows, len(c.examples)) for c in conversions],
        examples=len(items), train_examples=len(items) - n_val, val_examples=n_val,
        tokens=sum(len(x.input_ids) for x in items),
        target_tokens=sum(sum(1 for label in x.labels if label != IGNORE_INDEX) for x in items),
        max_length=max(len(x.input_ids) for x in items), truncation=truncation,
        documents=packed[0], blocks=packed[1], dropped=all_dropped, formats=formats,
    )
