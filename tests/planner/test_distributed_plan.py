"""Per-rank memory of an N-rank job: DDP = the one-process plan at B/N plus the gradient buffer; FSDP shards."""

from __future__ import annotations

import dataclasses

import pytest

from qlorakit.errors import ConfigError
from qlorakit.planner import PlanSettings, model_shape, plan
from qlorakit.planner.distributed import SHARDED, per_rank_plan


@pytest.fixture(scope="module")
def llama65():
    return model_shape("65b")


def test_ddp_rank_is_the_one_process_plan_of_its_share_plus_the_gradient_buffer(llama65):
    settings = PlanSettings(batch_size=8)
    one = plan(llama65, dataclasses.replace(settings, batch_size=2))
    rank = per_rank_plan(llama65, settings, 4, "ddp")
    assert rank.total_bytes == one.total_bytes + one.part("lora_grads")
    assert rank.part("weights_4bit") == one.part("weights_4bit")  # a whole replica on every rank


def test_fsdp_rank_holds_a_shard_of_the_base_and_state_plus_two_gathered_blocks(llama65):
    settings = PlanSettings(batch_size=8)
    one = plan(llama65, dataclasses.replace(settings, batch_size=1))
    rank = per_rank_plan(llama65, settings, 8, "fsdp")
    for name in SHARDED:
        assert rank.part(name) == -(-one.part(name) // 8)
    block = sum(one.part(n) for n in ("weights_4bit", "quant_constants", "lora_params")) // llama65.num_layers
    assert rank.part("fsdp_gathered_blocks") == 2 * block
    assert rank.part("activations") == one.part("activations")
    assert rank.total_bytes < per_rank_plan(llama65, settings, 8, "ddp").total_bytes


def test_a_world_size_that_does_not_divide_the_batch_is_refused(llama65):
    with pytest.raises(ConfigError, match="not divisible by --world-size 2"):
        per_rank_plan(llama65, PlanSettings(batch_size=3), 2, "ddp")
