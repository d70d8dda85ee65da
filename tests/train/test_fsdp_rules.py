"""The FSDP shard rule on one process (no process group): padding, block alignment, the rebuilt 4-bit view."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.parallel import SINGLE, Dist, choose_strategy
from qlorakit.parallel.fsdp import ShardedLinear4bit, padded_blocks, shard_of, to_sharded_storage
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.tensor import NESTED_BLOCKSIZE


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(50, 3), (64, 64), (192, 576)])  # a partial last block; whole; SmolLM2's k_proj
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_storage_views_the_same_bits_and_gives_the_same_output(shape, double_quant, world):
    torch.manual_seed(0)
    out_f, in_f = shape
    layer = Linear4bit.from_linear(nn.Linear(in_f, out_f), double_quant=double_quant)
    before, x = layer.qweight, torch.randn(5, in_f)
    want = layer(x)
    to_sharded_storage(layer, world)
    assert isinstance(layer, ShardedLinear4bit)
    assert layer.packed_rows.dtype == torch.uint8  # integer storage only: codes uint8, absmax uint8 / int32 bits
    assert layer.absmax_rows.dtype == (torch.uint8 if double_quant else torch.int32)
    after = layer.qweight
    assert after.packed.dtype == torch.uint8 and torch.equal(after.packed, before.packed)
    assert after.absmax.dtype == before.absmax.dtype and torch.equal(after.absmax, before.absmax)
    assert torch.equal(layer(x), want)
    rows = layer.packed_rows.shape[0]
    unit = NESTED_BLOCKSIZE if double_quant else 1
    assert rows % (world * unit) == 0 and rows >= before.num_blocks  # each rank: whole blocks and whole groups
    assert rows - before.num_blocks < world * unit  # the padding is less than one unit per rank
    shards = [shard_of(layer.packed_rows.data, r, world) for r in range(world)]
    assert [s.shape[0] for s in shards] == [rows // world] * world  # FSDP's dim-0 chunks: equal, unit-aligned


def test_smollm2_padding_on_two_ranks_is_under_3_percent():
    # SmolLM2-135M's block: q/o 576x576, k/v 192x576, gate/up/down 1536x576 (all 64-blocks, double quant)
    shapes = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 3

    class Q:  # the two fields padded_blocks reads
        def __init__(self, n):
            self.num_blocks, self.double_quant = n // 64, True

    real = sum(o * i // 64 for o, i in shapes)
    padded = sum(padded_blocks(Q(o * i), 2) for o, i in shapes)
    assert padded / real - 1 == pytest.approx(0.0278, abs=1e-3)


def test_auto_picks_fsdp_only_when_a_whole_replica_does_not_fit():
    two = Dist(rank=0, world_size=2, backend="gloo")
    assert choose_strategy("auto", SINGLE) is None
    assert choose_strategy("fsdp", two) == ("fsdp", "asked for (--distributed fsdp)")
    assert choose_strategy("auto", two, (True, "1 of 2 GiB"))[0] == "ddp"
    strategy, why = choose_strategy("auto", two, (False, "3 of 2 GiB"))
    assert strategy == "fsdp" and "does not fit" in why and "3 of 2 GiB" in why


def test_8bit_state_over_a_shard_is_refused_before_the_first_step():
    from qlorakit.errors import ConfigError
    from qlorakit.optim.adamw import AdamW
    from qlorakit.train.loop import _refuse_8bit_shards

    small, big = torch.zeros(16, 64), torch.zeros(64, 64)  # 1024 and 4096 elements; 8-bit from 4096 on
    _refuse_8bit_shards(AdamW([small], optim_bits=8), [small])  # every shard keeps 32-bit state: allowed
    _refuse_8bit_shards(AdamW([big], optim_bits=32), [big])
    with pytest.raises(ConfigError, match=r"\(64, 64\).*8-bit.*--optim paged_adamw"):
        _refuse_8bit_shards(AdamW([small, big], optim_bits=8), [small, big])


def test_a_sharded_run_resumes_unsharded_in_one_process(monkeypatch, capsys):
    from qlorakit.cli.train_cmd import unshard_for_one_process

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    base = {"train": {"max_steps": 4}, "parallel": {"distributed": "fsdp", "dist_timeout_s": 60}}
    out = unshard_for_one_process(base)
    assert out["parallel"] == {"distributed": "auto", "dist_timeout_s": 60} and out["train"] == base["train"]
    assert base["parallel"]["distributed"] == "fsdp"  # the loaded config itself is not changed
    assert "unsharded" in capsys.readouterr().out
    ddp = {"parallel": {"distributed": "ddp"}}
    assert unshard_for_one_process(ddp) is ddp
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun an FSDP run resumes sharded
    assert unshard_for_one_process(base)["parallel"]["distributed"] == "fsdp"
