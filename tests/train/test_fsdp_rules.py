"""The FSDP shard rules on one process (no process group): padding, block alignment, the rebuilt 4-bit view; the
8-bit optimizer state rule (a shard's 8-bit blocks are the whole parameter's)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.errors import ConfigError
from qlorakit.optim.state8bit import STATE_BLOCKSIZE, dequantize_moment, layout_8bit, quantize_moment_into
from qlorakit.parallel import SINGLE, Dist, choose_strategy
from qlorakit.parallel.fsdp import (
    ShardedLinear4bit,
    aligned_8bit,
    block_range,
    padded_blocks,
    shard_of,
    to_sharded_storage,
    unaligned_8bit,
)
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


def test_a_shard_keeps_the_state_kind_of_its_whole_parameter():
    from qlorakit.optim.adamw import AdamW

    shard, small = torch.zeros(32, 64), torch.zeros(16, 64)  # half of a (64, 64) lora_A; a whole 1024-element one
    opt = AdamW([shard, small], optim_bits=8, whole_numels=[4096, 1024])
    assert "exp_avg_codes" in opt._layout(shard) and "exp_avg" in opt._layout(small)
    assert "exp_avg" in AdamW([shard], optim_bits=8)._layout(shard)  # by its own 2048 elements: 32-bit
    with pytest.raises(ConfigError, match="whole_numels has 1 entries for 2 parameters"):
        AdamW([shard, small], optim_bits=8, whole_numels=[4096])


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


def _quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's 8-bit state (signed map): codes shaped as x, absmax per 256-element block."""
    layout = layout_8bit(x.shape)
    codes = torch.zeros(layout["exp_avg_codes"][0], dtype=torch.uint8)
    absmax = torch.zeros(layout["exp_avg_absmax"][0])
    quantize_moment_into(x.reshape(-1), codes, absmax, signed=True)
    return codes, absmax


@pytest.mark.parametrize(("shape", "world", "aligned"), [
    ((64, 64), 2, True),      # lora_A r 64 over d 64: 32 rows x 64 = 2048 elements per shard
    ((128, 64), 2, True),     # lora_B of a 128-row projection, r 64
    ((16, 576), 2, True),     # SmolLM2's lora_A, r 16: 8 x 576 = 4608 = 18 blocks
    ((8, 576), 4, False),     # ... r 8 on 4 ranks: 2 x 576 = 1152 = 4.5 blocks
    ((192, 30), 2, False),    # 96 x 30 = 2880 = 11.25 blocks
    ((5, 1000), 3, False),    # 2 x 1000; the last rank holds one row
    ((3, 4096), 4, True),     # 1 row per rank, the fourth rank empty
    ((1, 8192), 2, True),     # one row: all on rank 0
])
def test_the_8bit_rule_says_when_each_shards_blocks_are_the_whole_parameters(shape, world, aligned):
    torch.manual_seed(0)
    whole = torch.randn(shape)
    codes, absmax = _quantized(whole)
    assert aligned_8bit(shape, world) is aligned
    pieces = [_quantized(shard_of(whole, r, world)) for r in range(world)]  # each rank quantizes its own shard
    same = torch.equal(torch.cat([c for c, _ in pieces]), codes) and torch.equal(torch.cat([a for _, a in pieces]),
                                                                                    absmax)
    assert same is aligned  # the rule is exactly the condition for rank-local blocks == the one-process blocks
    if aligned:  # and the consolidation / cutting of the block scales are inverse
        for r, (_, mine) in enumerate(pieces):
            first, count = block_range(shape, r, world)
            assert torch.equal(absmax[first : first + count], mine)
        moment = torch.cat([dequantize_moment(c, a, signed=True) for c, a in pieces])
        assert torch.equal(moment, dequantize_moment(codes, absmax, signed=True))


def _lora_shapes(linears: list[tuple[int, int]], r: int) -> list[tuple[int, int]]:
    return [shape for out_f, in_f in linears for shape in ((r, in_f), (out_f, r))]  # lora_A, lora_B


@pytest.mark.parametrize(("r", "world", "whole"), [
    (16, 2, 0), (64, 2, 0), (16, 4, 0), (64, 8, 0),
    (16, 8, 9),  # lora_A over d 576 (q, o, k, v, gate, up: 2 rows x 576) and lora_B of the 576-row q, o and down
])               # (72 rows x 16): 1152 elements per rank; k/v lora_B (3072) keep 32-bit state, the rest align
def test_smollm2_lora_shapes_under_the_8bit_rule(r, world, whole):
    # SmolLM2-135M's block as in the padding test; Llama-2-70B's (d 8192, f 28672, k/v 1024) for comparison
    smol = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
    llama70b = [(8192, 8192)] * 2 + [(1024, 8192)] * 2 + [(28672, 8192)] * 2 + [(8192, 28672)]
    assert len(unaligned_8bit(_lora_shapes(smol, r), world, min_8bit_size=4096)) == whole  # kept whole per rank
    assert unaligned_8bit(_lora_shapes(llama70b, r), world, min_8bit_size=4096) == []


def test_only_parameters_with_8bit_state_that_break_the_rule_are_kept_whole():
    shapes = [(8, 576), (4, 576), (64, 64), (16, 576)]  # breaks it; 32-bit state (2304 elements); aligned; aligned
    assert unaligned_8bit(shapes, 4, min_8bit_size=4096) == [0]
    assert unaligned_8bit(shapes, 1, min_8bit_size=4096) == []  # one rank: nothing is cut
    assert STATE_BLOCKSIZE == 256
