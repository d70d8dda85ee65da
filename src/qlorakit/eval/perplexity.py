"""Perplexity of a causal LM on a text file, with a sliding window (the Hugging Face perplexity guide's method).

The file is tokenized once into ``x_0 .. x_{N-1}`` (the tokenizer's special tokens included, as
``tokenizer(text)`` gives them). Windows of at most ``L = max_seq_len`` tokens start every ``stride``
tokens: window ``w`` covers ``[b_w, e_w)`` with ``b_w = w * stride``, ``e_w = min(b_w + L, N)``, the last
window being the first that reaches ``N``. Each window scores only the tokens no earlier window scored:
token ``t`` is scored in the window with ``max(e_{w-1}, b_w + 1) <= t < e_w`` (``e_{-1} = 0``), predicted
from the window's tokens ``x_{b_w} .. x_{t-1}``. So with ``stride < L`` every token but ``x_0`` is scored
exactly once, with at least ``L - stride`` tokens of context once the first window is past; with
``stride = L`` the windows are disjoint and each window's first token is not scored. ``stride > L``
would skip tokens and is refused.

    NLL = sum over scored t of -log p(x_t | window context),    PPL = exp(NLL / T),  T = scored tokens

``perplexity`` runs windows in batches through the decoder and applies the output head only to the
scored positions, in chunks (``lm_scoring``); ``perplexity_reference`` computes every token with its
own plain ``model(...)`` forward over exactly its context, the slow oracle of the tests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qlorakit.errors import ConfigError, DataError
from qlorakit.eval import lm_scoring

TEXT_FIELD = "text"  # the field of a .jsonl row that holds its document
DOCUMENT_SEPARATOR = "\n\n"  # between the documents of a .jsonl file (the HF guide joins wikitext so)
_HEAD_CHUNK = 1024  # scored positions per output-head call: 1024 x vocab fp32 logits at a time


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` are the model's input; tokens ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    nll_sum: float
    tokens: int  # scored tokens
    text_tokens: int  # tokens of the whole text
    windows: int
    max_seq_len: int
    stride: int

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def read_text(path: str | os.PathLike) -> str:
    """A plain-text file whole, or a ``.jsonl`` file's ``text`` fields joined by a blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such text file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); convert it to UTF-8") from exc
    if path.suffix == ".jsonl":
        raw = DOCUMENT_SEPARATOR.join(_jsonl_documents(path, raw))
    if not raw.strip():
        raise DataError(f"{path}: the file is empty (no text to score)")
    return raw


def _jsonl_documents(path: Path, raw: str) -> list[str]:
    documents = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get(TEXT_FIELD), str):
            raise DataError(f"{path}: line {number}: needs a string field {TEXT_FIELD!r} holding the document")
        documents.append(row[TEXT_FIELD])
    return documents


def check_window(max_seq_len: int, stride: int | None) -> int:
    """The stride to use (default ``max_seq_len``: disjoint windows); ConfigError on bad values."""
    if max_seq_len < 2:
        raise ConfigError(f"max_seq_len = {max_seq_len}: a window needs at least 2 tokens")
    stride = max_seq_len if stride is None else stride
    if stride < 1:
        raise ConfigError(f"stride = {stride}: must be >= 1")
    if stride > max_seq_len:
        raise ConfigError(f"stride = {stride} > max_seq_len = {max_seq_len}: tokens between windows would never be "
                          "scored; use a stride <= max_seq_len (= max_seq_len for disjoint windows)")
    return stride


def sliding_windows(n_tokens: int, max_seq_len: int, stride: int) -> list[Window]:
    """The windows of the module docstring for a text of ``n_tokens`` tokens."""
    check_window(max_seq_len, stride)
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_len, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _window_nll(model: Any, ids: torch.Tensor, batch: Sequence[Window]) -> float:
    """Summed NLL of the scored tokens of ``batch`` (windows of ``ids``), run as one right-padded batch."""
    device = model.get_output_embeddings().weight.device
    width = max(w.end - w.begin for w in batch)
    inputs = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, w in enumerate(batch):
        inputs[row, : w.end - w.begin] = ids[w.begin:w.end]
        mask[row, : w.end - w.begin] = 1
    hidden, _ = lm_scoring.decoder_hidden(model, inputs.to(device), mask.to(device))  # (B, W, hidden)
    # The hidden state at window column c predicts token begin + c + 1.
    picked = torch.cat([hidden[row, w.score_from - 1 - w.begin: w.end - 1 - w.begin] for row, w in enumerate(batch)])
    targets = torch.cat([ids[w.score_from:w.end] for w in batch]).to(device)  # (T,)
    total = 0.0
    for start in range(0, len(targets), _HEAD_CHUNK):
        logits = lm_scoring.head_logits(model, picked[start:start + _HEAD_CHUNK])  # (chunk, vocab) fp32
        log_p = torch.log_softmax(logits, dim=-1).gather(1, targets[start:start + _HEAD_CHUNK, None])  # (chunk, 1)
        total -= float(log_p.double().sum())
    return total


def _result(
    nll_sum: float, tokens: int, n_tokens: int, windows: int, max_seq_len: int, stride: int
) -> PerplexityResult:
    return PerplexityResult(math.exp(nll_sum / tokens), nll_sum / tokens, nll_sum, tokens, n_tokens, windows,
                            max_seq_len, stride)


def perplexity(model: Any, token_ids: Sequence[int], max_seq_len: int, stride: int | None = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity of ``token_ids`` (see the module docstring); windows run ``batch_size`` at a time."""
    stride = check_window(max_seq_len, stride)
    if len(token_ids) < 2:
        raise DataError(f"the text has {len(token_ids)} token(s); perplexity needs at least 2")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}: must be >= 1")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    windows = sliding_windows(len(ids), max_seq_len, stride)
    nll_sum = 0.0
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
            nll_sum += _window_nll(model, ids, windows[start:start + batch_size])
    tokens = sum(w.end - w.score_from for w in windows)
    return _result(nll_sum, tokens, len(ids), len(windows), max_seq_len, stride)


def perplexity_reference(
    model: Any, token_ids: Sequence[int], max_seq_len: int, stride: int | None = None
) -> PerplexityResult:
    """The slow oracle: one plain ``model(input_ids)`` forward per scored token, over exactly its context."""
    stride = check_window(max_seq_len, stride)
    ids = list(token_ids)
    device = model.get_output_embeddings().weight.device
    windows = sliding_windows(len(ids), max_seq_len, stride)
    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(w.score_from, w.end):
                logits = model(input_ids=torch.tensor([ids[w.begin:t]], device=device)).logits[0, -1].double()
                nll_sum -= float(torch.log_softmax(logits, dim=-1)[ids[t]])
                tokens += 1
    return _result(nll_sum, tokens, len(ids), len(windows), max_seq_len, stride)


def evaluate_file(model: Any, tokenizer: Any, path: str | os.PathLike, max_seq_len: int, stride: int | None = None,
                  batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Read, tokenize and score one text file (inputs checked before the model runs)."""
    stride = check_window(max_seq_len, stride)
    text = read_text(path)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"{path}: {len(ids)} token(s) after tokenization; perplexity needs at least 2")
    return perplexity(model, ids, max_seq_len, stride, batch_size, progress)


def format_table(result: PerplexityResult, name: str = "") -> str:
    lines = [f"{'file':<28} {'perplexity':>11} {'nll':>8} {'tokens':>9} {'windows':>8} {'window':>7} {'stride':>7}",
             (f"{name:<28} {result.perplexity:>11.4f} {result.nll:>8.4f} {result.tokens:>9} {result.windows:>8} "
              f"{result.max_seq_len:>7} {result.stride:>7}")]
    return "\n".join(lines)
