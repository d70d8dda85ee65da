"""The decoding loop: prefill the prompt once, then feed one token at a time through a KV cache.

Step 0 runs the whole prompt ``ids (1, prompt_len)`` through the model with an empty
``transformers.DynamicCache``, keeping only the last position's logits; every later step feeds the one
token just chosen, ``(1, 1)``, and the cache supplies the keys and values of all earlier positions, so
a step costs one batch-1 forward (the 4-bit linears take their matrix-vector path, ``quant.gemv``).
The loop stops after ``max_new_tokens`` tokens or at a stop token (EOS), which is not part of the text.

Streaming: ``TextStream`` decodes the whole generated sequence after each token and hands out the new
suffix. A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; the decoder then
shows U+FFFD at the end, so such a tail is held back until the character is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from qlorakit.errors import ConfigError
from qlorakit.generate.sampling import GREEDY, SamplingConfig, next_token

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class Generation:
    """The outcome of one request: the new token ids, their text, and why it stopped (``eos``/``length``)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the model's generation config, its config and the tokenizer (any may be a list)."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        found.update([value] if isinstance(value, int) else list(value or []))
    return found


@torch.inference_mode()
def generate_ids(
    model: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    lean: bool = True,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids for ``prompt_ids``; a stop id is yielded, then it ends.

    ``lean=True`` runs supported architectures through ``generate.lean.LeanDecoder`` (same logits, less
    Python per step); ``lean=False``, or a model it does not cover, runs transformers' forward.
    """
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token (an empty string tokenizes to nothing)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: must be at least 1")
    device = getattr(model, "device", torch.device("cpu"))
    generator = None if sampling.greedy else sampling.generator()
    forward = _lean_forward(model, len(prompt_ids) + max_new_tokens) if lean else None
    if forward is None:
        forward = _reference_forward(model)
    ids = torch.tensor([prompt_ids], device=device)  # (1, prompt_len)
    for _ in range(max_new_tokens):
        token = next_token(forward(ids), sampling, generator)
        yield token
        if token in stop_ids:
            return
        ids = torch.tensor([[token]], device=device)  # (1, 1)


def _reference_forward(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' forward with a ``DynamicCache``: ids (1, t) -> the last position's logits (vocab,)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    return forward


def _lean_forward(model: Any, max_len: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``LeanDecoder(model, max_len).step`` where it applies (CPU, a supported architecture), else ``None``."""
    from qlorakit.generate.lean import LeanDecoder, unsupported_reason

    device = getattr(model, "device", torch.device("cpu"))
    if torch.device(device).type != "cpu" or unsupported_reason(model, max_len) is not None:
        return None
    return LeanDecoder(model, max_len).step


class TextStream:
    """Turns a growing list of token ids into text pieces; the pieces concatenate to the full decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR):  # an unfinished multi-byte character: wait for its other bytes
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """The text not yet handed out (a genuinely invalid byte tail comes out as U+FFFD)."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        # Decoding is prefix-stable for byte-level BPE; should a tokenizer rewrite earlier text, the pieces
        # follow the new text from the same offset (``emitted`` always holds the latest full decode).
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Run ``generate_ids`` and stream the text to ``on_text``; return the whole ``Generation``."""
    stops = stop_token_ids(model, tokenizer)
    stream = TextStream(tokenizer)
    result = Generation()
    for token in generate_ids(model, prompt_ids, max_new_tokens, sampling, stops):
        if token in stops:
            result.finish_reason = "eos"
            break
        result.token_ids.append(token)
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)
    tail = stream.finish()
    if tail and on_text is not None:
        on_text(tail)
    result.text = stream.emitted
    return result
