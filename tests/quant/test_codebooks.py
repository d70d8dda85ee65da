"""The code tables: NF4 derived from normal quantiles, FP4/INT4 as bitsandbytes defines them."""

import pytest
import torch

from qlorakit.quant.codebooks import (
    NF4_PUBLISHED,
    code_table,
    dynamic_map_8bit,
    midpoints,
)

bnbF = pytest.importorskip("bitsandbytes.functional")


def test_nf4_derived_from_quantiles_equals_published_values():
    assert torch.equal(code_table("nf4"), torch.tensor(NF4_PUBLISHED, dtype=torch.float32))


def test_nf4_has_exact_zero_seven_negative_eight_positive():
    table = code_table("nf4")
    assert (table < 0).sum() == 7 and (table == 0).sum() == 1 and (table > 0).sum() == 8
    assert table[0] == -1 and table[-1] == 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_table_equals_bitsandbytes(quant_type):
    assert torch.equal(code_table(quant_type), bnbF.get_4bit_type(quant_type, device="cpu"))


def test_int4_table_is_bitsandbytes_int4_grid():
    # bitsandbytes 0.50.2 lists int4 as [7..0, -0..-7] / 7 but its get_4bit_type("int4") fails on an
    # integer tensor, so the list is spelled out here in its index order.
    expected = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7]) / 7
    assert torch.equal(code_table("int4"), expected)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    assert torch.equal(dynamic_map_8bit(signed), bnbF.create_dynamic_map(signed=signed))


def test_nf4_matches_bitsandbytes_create_normal_map():
    pytest.importorskip("scipy")
    full = bnbF.create_normal_map()
    nonzero_and_one_zero = torch.cat([full[full < 0], torch.zeros(1), full[full > 0]])
    assert torch.equal(code_table("nf4"), nonzero_and_one_zero)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_midpoints_map_every_entry_to_itself(quant_type):
    table = code_table(quant_type)
    bounds, order = midpoints(table)
    codes = order[torch.bucketize(table, bounds)]
    assert torch.equal(table[codes], table)  # +0/-0 may swap codes but decode to the same value


def test_code_table_returns_a_fresh_tensor():
    table = code_table("nf4")
    table.zero_()
    assert code_table("nf4")[0] == -1
