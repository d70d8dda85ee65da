"""Choosing the next token from the model's logits: greedy, temperature, and top-p (nucleus) sampling.

For logits ``z`` (vocab,) and temperature ``T > 0`` the token distribution is

    p_i = exp(z_i / T) / sum_j exp(z_j / T)

Top-p (Holtzman et al., 2020) keeps the smallest set of most likely tokens whose mass reaches ``top_p``:
sort ``p`` descending, keep token ``k`` (in sorted order) when the mass of the tokens before it,
``sum_{m<k} p_(m)``, is below ``top_p`` (so the most likely token is always kept), renormalize over the
kept set and draw one token with a seeded ``torch.Generator``. ``T -> 0`` concentrates all mass on the
argmax, which is why ``temperature = 0`` means greedy decoding (``argmax z``, the lowest index on ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlorakit.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature = 0`` is greedy (``top_p`` and ``seed`` then unused)."""

    temperature: float = 0.0  # >= 0; 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = no nucleus cut
    seed: int = 0  # seeds the generator of a sampling run

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature = {self.temperature}: must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p = {self.top_p}: must be in (0, 1] (1 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed`` (one per request, so a request is reproducible)."""
        return torch.Generator().manual_seed(self.seed)


#: The default: greedy decoding.
GREEDY = SamplingConfig()


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (vocab,) -> the nucleus of mass ``top_p``, renormalized; dropped tokens get probability 0."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(descending=True)  # (vocab,)
    mass_before = sorted_probs.cumsum(0) - sorted_probs  # mass of the strictly more likely tokens
    keep_sorted = mass_before < top_p  # the first entry is always kept (mass_before = 0)
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs * keep_sorted)
    return kept / kept.sum()


def next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token id from logits (vocab,) (or (1, vocab))."""
    logits = logits.reshape(-1).float()  # (vocab,)
    if config.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / config.temperature, dim=0)
    probs = top_p_filter(probs, config.top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
