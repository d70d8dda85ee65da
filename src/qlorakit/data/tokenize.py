"""Tokenization with label masking and truncation, and packing for the ``text`` format.

Each rendered segment (see ``templates.py``) is tokenized on its own, without special tokens, and the
pieces are concatenated, as the paper's ``qlora.py`` tokenizes source and target separately; answers
get EOS appended where the template did not write one. ``labels`` equal ``input_ids`` on the answer
tokens of EVERY assistant turn (EOS included) and are -100 (``IGNORE_INDEX``) elsewhere, unless
``train_on_source`` puts loss on every token. Non-chat-template prompts start with the BOS the
tokenizer would add itself (none for SmolLM2, ``<s>`` for Llama).

Truncation, in this order, counted in ``TruncationStats``:

1. every answer keeps its FIRST ``target_max_len`` tokens (as the paper does; a cut answer loses its
   EOS, so the model is never taught to stop mid-sentence);
2. the source, i.e. every token before the last answer (system prompt, earlier turns with their
   answers, the last prompt), keeps its LAST ``source_max_len`` tokens, those next to the answer, so
   the ``### Response:`` / assistant header survives; the tokenizer's BOS stays in front and counts;
3. the whole example is cut to ``DataConfig.seq_limit`` tokens: more source from the front, then the
   end of the answer.

Text documents are tokenized, each followed by EOS (and preceded by the tokenizer's BOS), joined into
one stream and cut into ``block_size`` blocks with ``labels == input_ids``; the last block may be
shorter (it is padded in the batch), and a last block of one token is dropped.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qlorakit.config import DataConfig
from qlorakit.data.schema import Example
from qlorakit.data.templates import render, uses_chat_template
from qlorakit.errors import DataError

IGNORE_INDEX = -100
CHUNK = 2048


@dataclass
class TruncationStats:
    """Examples with any token cut, and the cut source (prompt) and target (answer) tokens."""

    examples: int = 0
    source_examples: int = 0
    source_tokens: int = 0
    target_examples: int = 0
    target_tokens: int = 0


@dataclass(frozen=True)
class TokenizedExample:
    """Model inputs of one example (or one packed block) and where it came from."""

    input_ids: list[int]
    labels: list[int]
    origin: str
    format: str


def bos_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of a text when adding special tokens (BOS or nothing)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before building the data")
    return int(eos)


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts without special tokens, in batches (fast tokenizers run them in parallel)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), CHUNK):
        chunk = list(texts[start : start + CHUNK])
        ids.extend(list(x) for x in tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_conversations(
    examples: Sequence[Example], tokenizer: Any, cfg: DataConfig
) -> tuple[list[TokenizedExample], TruncationStats, dict[str, int]]:
    """Render (validating templates for all examples first), tokenize, mask and truncate."""
    rendered = [render(ex, tokenizer, cfg.chat_template) for ex in examples]
    flat = encode(tokenizer, [seg.text for segs in rendered for seg in segs])
    eos, bos, stats = eos_id(tokenizer), bos_prefix(tokenizer), TruncationStats()
    out: list[TokenizedExample] = []
    dropped: dict[str, int] = {}
    at = 0
    for ex, segs in zip(examples, rendered, strict=True):
        pieces = [(flat[at + i] + ([eos] if seg.add_eos else []), seg.is_target) for i, seg in enumerate(segs)]
        at += len(segs)
        templated = uses_chat_template(ex, tokenizer, cfg.chat_template)  # the template writes its own BOS
        result = assemble(pieces, [] if templated else bos, cfg, stats)
        if result is None:
            reason = "no answer token left after truncation"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        out.append(TokenizedExample(result[0], result[1], ex.origin, ex.format))
    return out, stats, dropped


def assemble(
    pieces: list[tuple[list[int], bool]], bos: list[int], cfg: DataConfig, stats: TruncationStats
) -> tuple[list[int], list[int]] | None:
    """Concatenate prompt/answer pieces into (input_ids, labels) with the truncation rules above."""
    while pieces and not pieces[-1][1]:
        pieces = pieces[:-1]  # formatting after the last answer is never trained on
    ids: list[int] = []
    labels: list[int] = []
    target_cut, answer_len = 0, 0
    for piece, is_target in pieces:
        if is_target and len(piece) > cfg.target_max_len:
            target_cut += len(piece) - cfg.target_max_len
            piece = piece[: cfg.target_max_len]
        ids += piece
        labels += piece if is_target or cfg.train_on_source else [IGNORE_INDEX] * len(piece)
        answer_len = len(piece) if is_target else answer_len
    source_len = len(ids) - answer_len
    room = max(min(cfg.source_max_len, cfg.seq_limit - answer_len) - len(bos), 0)
    source_cut = max(source_len - room, 0)
    ids = bos + ids[source_cut:]
    labels = (list(bos) if cfg.train_on_source else [IGNORE_INDEX] * len(bos)) + labels[source_cut:]
    if len(ids) > cfg.seq_limit:
        target_cut += len(ids) - cfg.seq_limit
        ids, labels = ids[: cfg.seq_limit], labels[: cfg.seq_limit]
    _count(stats, source_cut, target_cut)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


def _count(stats: TruncationStats, source_cut: int, target_cut: int) -> None:
    stats.examples += bool(source_cut or target_cut)
    stats.source_examples += bool(source_cut)
    stats.source_tokens += source_cut
    stats.target_examples += bool(target_cut)
    stats.target_tokens += target_cut


def pack_documents(documents: Sequence[Example], tokenizer: Any, block_size: int) -> list[TokenizedExample]:
    """Tokenize documents, join them with EOS into one stream and cut it into ``block_size`` blocks."""
    bos, eos = bos_prefix(tokenizer), eos_id(tokenizer)
    stream: list[int] = []
    starts: list[int] = []
    for ids in encode(tokenizer, [doc.text for doc in documents]):
        starts.append(len(stream))
        stream += bos + ids + [eos]
    blocks = []
    for start in range(0, len(stream), block_size):
        block = stream[start : start + block_size]
        if len(block) < 2:
            break  # a lone last token has nothing to predict
        origin = documents[bisect.bisect_right(starts, start) - 1].origin
        blocks.append(TokenizedExample(block, list(block), origin, "text"))
    return blocks
