"""Target discovery: all-linear, name lists, regular expressions, and the error for unknown names."""

import pytest
from torch import nn

from qlorakit.errors import ConfigError
from qlorakit.lora.targets import linear_names, resolve_targets
from qlorakit.quant import Linear4bit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.up_proj = Linear4bit(8, 16)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.pooler = nn.Linear(8, 8)  # a linear outside the repeated blocks
        self.lm_head = nn.Linear(8, 10)


def test_all_linear_takes_every_block_linear_and_never_the_head():
    model = Tiny()
    assert linear_names(model) == [
        "layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj", "pooler", "lm_head",
    ]
    assert resolve_targets(model, "all-linear") == [
        "layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]


def test_name_list_matches_path_suffixes_in_model_order():
    assert resolve_targets(Tiny(), ("up_proj", "layers.0.q_proj")) == [
        "layers.0.q_proj", "layers.0.up_proj", "layers.1.up_proj"]


def test_regex_matches_whole_paths():
    assert resolve_targets(Tiny(), r"re:layers\.1\..*") == ["layers.1.q_proj", "layers.1.up_proj"]


def test_unknown_name_lists_the_names_that_exist():
    with pytest.raises(ConfigError, match=r"'k_proj' matches no linear layer; "
                                          r"names that exist: \['lm_head', 'pooler', 'q_proj', 'up_proj'\]"):
        resolve_targets(Tiny(), ["k_proj"])


def test_regex_matching_nothing_fails():
    with pytest.raises(ConfigError, match="matched no linear layer"):
        resolve_targets(Tiny(), "re:nothing")


def test_a_model_without_blocks_has_no_all_linear_targets():
    with pytest.raises(ConfigError, match="found no linear layer inside repeated blocks"):
        resolve_targets(nn.Module(), "all-linear")
