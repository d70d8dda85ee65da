"""Preference pairs for DPO / ORPO: tokenize both conversations, hold out by prompt, batch chosen + rejected.

``tokenize_pairs`` renders the chosen and the rejected conversation of each ``preference`` example with the
same templates as SFT (``templates.render``) and truncates each with ``tokenize.assemble`` (answers keep their
first ``target_max_len`` tokens, the prompt its last ``source_max_len``). Labels are the completion's tokens
only: assistant turns inside the prompt and the prompt itself are ``IGNORE_INDEX`` (``train_on_source`` does
not apply to preference data). A pair whose chosen or rejected side keeps no answer token is dropped and counted.

``split_pairs`` holds out ``val_size`` pairs (a fraction < 1, rounded up, or a count >= 1) **by prompt**: pairs
that share a prompt text land on the same side, so a held-out question was never trained on. Whole prompt
groups are taken in a seeded order until the count is reached, so the held-out set can be a little larger.

``collate_pairs`` puts a micro-batch of ``B`` pairs into ONE right-padded batch of ``2B`` rows: rows ``0..B-1``
are the chosen sequences, rows ``B..2B-1`` the rejected ones in the same order (``pair_rows`` says how many
pairs), so one forward scores both sides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from qlorakit.config import DataConfig
from qlorakit.data.batching import collate, pad_id_of
from qlorakit.data.formats import load_examples
from qlorakit.data.schema import Example
from qlorakit.data.templates import Segment, render, uses_chat_template
from qlorakit.data.tokenize import TruncationStats, assemble, bos_prefix, encode, eos_id
from qlorakit.errors import DataError


@dataclass(frozen=True)
class TokenizedPair:
    """Model inputs of both sides of one preference pair, the prompt text (for the split) and the origin."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt: str
    origin: str


class PairDataset(Sequence[dict[str, list[int]]]):
    """Tokenized pairs; ``ds[i]`` has ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels`` and ``index`` ([i], so cached reference log-probs can be looked up).

    ``lengths[i]`` is the longer side's length (the padded width the pair needs), for length grouping.
    """

    def __init__(self, items: Sequence[TokenizedPair]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:  # type: ignore[override]
        p = self.items[index]
        return {"chosen_input_ids": p.chosen_ids, "chosen_labels": p.chosen_labels,
                "rejected_input_ids": p.rejected_ids, "rejected_labels": p.rejected_labels, "index": [index]}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        return [max(len(p.chosen_ids), len(p.rejected_ids)) for p in self.items]

    def origin(self, index: int) -> str:
        return self.items[index].origin


@dataclass
class PairSummary:
    """What was read and built for preference training."""

    files: list[tuple[str, str, int, int]]  # (path, format, rows, pairs)
    pairs: int
    train_pairs: int
    val_pairs: int
    val_prompts: int
    tokens: int
    max_length: int
    truncation: TruncationStats
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"data       {self.pairs:,} preference pairs ({self.train_pairs:,} train / {self.val_pairs:,} "
                 f"held out, {self.val_prompts:,} held-out prompts)"]
        lines += [f"  {path}: {fmt}, {rows:,} rows -> {n:,} pairs" for path, fmt, rows, n in self.files]
        t = self.truncation
        lines.append(f"  tokens {self.tokens:,} (both sides), longest side {self.max_length}; truncated "
                     f"{t.examples:,} sequences (source {t.source_tokens:,}, target {t.target_tokens:,} tokens cut)")
        lines += [f"  dropped {n:,}: {why}" for why, n in self.dropped.items()]
        return "\n".join(lines)


def _side(ex: Example, turns: tuple, tokenizer: Any, cfg: DataConfig, stats: TruncationStats):
    """(input_ids, labels) of one conversation with loss on the completion's answers only, or None."""
    conversation = Example("messages", ex.origin, turns)
    segments = render(conversation, tokenizer, cfg.chat_template)
    prompt_answers = sum(1 for t in turns[: ex.prompt_turns] if t.role == "assistant")
    marked: list[Segment] = []
    for seg in segments:  # the first ``prompt_answers`` answer segments belong to the prompt: context only
        if seg.is_target and prompt_answers:
            prompt_answers -= 1
            seg = Segment(seg.text, False, seg.add_eos)
        marked.append(seg)
    ids = encode(tokenizer, [s.text for s in marked])
    pieces = [(piece + ([eos_id(tokenizer)] if s.add_eos else []), s.is_target) for piece, s in zip(ids, marked,
                                                                                                  strict=True)]
    bos = [] if uses_chat_template(conversation, tokenizer, cfg.chat_template) else bos_prefix(tokenizer)
    return assemble(pieces, bos, cfg, stats)


def tokenize_pairs(examples: Sequence[Example], tokenizer: Any, cfg: DataConfig
                   ) -> tuple[list[TokenizedPair], TruncationStats, dict[str, int]]:
    """Both sides of every pair (see the module docstring); pairs left without an answer token are dropped."""
    cfg = dataclasses.replace(cfg, train_on_source=False)
    stats, out, dropped = TruncationStats(), [], {}
    for ex in examples:
        chosen = _side(ex, ex.turns, tokenizer, cfg, stats)
        rejected = _side(ex, ex.rejected, tokenizer, cfg, stats)
        if chosen is None or rejected is None:
            reason = "preference pair with no answer token left after truncation"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        prompt = "\n".join(f"{t.role}: {t.content}" for t in ex.turns[: ex.prompt_turns])
        out.append(TokenizedPair(chosen[0], chosen[1], rejected[0], rejected[1], prompt, ex.origin))
    return out, stats, dropped


def split_pairs(prompts: Sequence[str], val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) pair indices, each sorted; pairs with the same prompt stay on one side."""
    n = len(prompts)
    if val_size <= 0:
        return list(range(n)), []
    target = math.ceil(n * val_size) if val_size < 1 else int(val_size)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    order = list(groups.values())
    rng = np.random.default_rng([seed % 2**63, 0x76616C])  # "val", as dataset.split_indices
    held: list[int] = []
    for g in rng.permutation(len(order)):
        if len(held) >= target:
            break
        held += order[int(g)]
    if len(held) >= n:
        raise DataError(f"val_size = {val_size} holds out {len(held)} of {n} pairs (whole prompts at a time) and "
                        "leaves none for training; use a smaller fraction or count")
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], sorted(held)


def build_pair_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[PairDataset, PairDataset, PairSummary]:
    """Train and held-out preference pairs from ``cfg.paths`` (every file must be in the preference format)."""
    conversions = load_examples(cfg.paths, cfg.format)
    for c in conversions:
        if c.format != "preference":
            raise DataError(f"{c.path}: DPO / ORPO train on preference pairs, but this file is format {c.format!r}; "
                            "give rows with prompt (or messages), chosen and rejected, or train it with --method sft")
    examples = [ex for c in conversions for ex in c.examples]
    pairs, stats, dropped = tokenize_pairs(examples, tokenizer, cfg)
    if not pairs:
        raise DataError(f"no preference pairs in {', '.join(cfg.paths)} (every pair was dropped: {dropped})")
    train_idx, val_idx = split_pairs([p.prompt for p in pairs], cfg.val_size, cfg.seed)
    summary = PairSummary(
        files=[(c.path, c.format, c.rows, len(c.examples)) for c in conversions], pairs=len(pairs),
        train_pairs=len(train_idx), val_pairs=len(val_idx), val_prompts=len({pairs[i].prompt for i in val_idx}),
        tokens=sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        max_length=max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), truncation=stats,
        dropped=dropped)
    return PairDataset([pairs[i] for i in train_idx]), PairDataset([pairs[i] for i in val_idx]), summary


def collate_pairs(pairs: Sequence[Mapping[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
                  ) -> dict[str, torch.Tensor]:
    """``B`` pairs -> one right-padded batch of ``2B`` rows (chosen first), plus ``pair_index`` (B,)."""
    rows = [{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"]} for p in pairs]
    rows += [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs]
    batch = collate(rows, pad_id, pad_to_multiple_of)  # input_ids / attention_mask / labels: (2B, T)
    batch["pair_index"] = torch.tensor([int(p.get("index", [-1])[0]) for p in pairs], dtype=torch.long)  # (B,)
    return batch


def pair_collate_fn(tokenizer: Any, pad_to_multiple_of: int = 1) -> Callable[[Sequence[Mapping]], dict]:
    """``collate_pairs`` bound to the tokenizer's pad id."""
    return partial(collate_pairs, pad_id=pad_id_of(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
