"""The planner counts a DPO / ORPO micro-batch of B pairs as 2B sequences (chosen + rejected in one batch)."""

from __future__ import annotations

import pytest

from qlorakit.errors import ConfigError
from qlorakit.planner import PlanSettings, model_shape, plan


def test_a_dpo_batch_of_pairs_plans_like_sft_with_twice_the_sequences():
    shape = model_shape("7b", "all-linear")
    parts = {}
    for method, batch in (("sft", 4), ("dpo", 2), ("orpo", 2), ("sft", 2)):
        result = plan(shape, PlanSettings(batch_size=batch, method=method))
        parts[(method, batch)] = {p.name: p.nbytes for p in result.parts}
    assert parts[("dpo", 2)] == parts[("sft", 4)] == parts[("orpo", 2)]
    assert parts[("dpo", 2)] != parts[("sft", 2)]
    with pytest.raises(ConfigError, match="PlanSettings.method"):
        PlanSettings(method="ppo")
