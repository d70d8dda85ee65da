"""Next-token choice: top-p keeps the smallest set reaching the mass, T -> 0 is greedy, seeds reproduce."""

import pytest
import torch

from qlorakit.errors import ConfigError
from qlorakit.generate import SamplingConfig, next_token, top_p_filter


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    kept = top_p_filter(probs, 0.8)  # 0.5 + 0.3 = 0.8 reaches it: two tokens
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)
    kept = top_p_filter(probs, 0.81)  # needs the third token
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)
    assert top_p_filter(probs, 0.1).nonzero().flatten().tolist() == [1]  # the top token is always kept


def test_sampling_never_draws_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    config = SamplingConfig(temperature=1.0, top_p=0.8, seed=3)
    generator = config.generator()
    draws = {next_token(logits, config, generator) for _ in range(200)}
    assert draws == {1, 3}


def test_temperature_near_zero_equals_greedy():
    logits = torch.randn(50, 1000)
    cold = SamplingConfig(temperature=1e-6, seed=1)
    generator = cold.generator()
    for row in logits:
        assert next_token(row, cold, generator) == next_token(row, SamplingConfig()) == int(row.argmax())


def _draws(seed: int, n: int = 20) -> list[int]:
    config = SamplingConfig(temperature=1.0, seed=seed)
    generator = config.generator()
    return [next_token(torch.zeros(1000), config, generator) for _ in range(n)]


def test_same_seed_same_draws_other_seed_other_draws():
    assert _draws(0) == _draws(0)
    assert _draws(0) != _draws(1)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5)])
def test_invalid_sampling_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{field: value})
