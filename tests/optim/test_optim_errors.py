"""Errors name the cause and the fix: optimizer names, budgets, hyperparameters and mismatched state."""

import pytest
import torch

from qlorakit.errors import ConfigError, StateDictError
from qlorakit.optim import OPTIMIZER_NAMES, AdamW, make_optimizer
from tests.helpers.optim import HYPER, SHAPES, gradients, make_params, run_steps

FACTORY_ARGS = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


@pytest.mark.parametrize(
    "name, bits, paged",
    [("adamw", 32, False), ("adamw8bit", 8, False), ("paged_adamw", 32, True), ("paged_adamw8bit", 8, True)],
)
def test_make_optimizer_names_choose_bits_and_paging(name, bits, paged):
    opt = make_optimizer(name, make_params(), **FACTORY_ARGS)
    assert isinstance(opt, AdamW) and opt.optim_bits == bits and (opt.store is not None) == paged
    assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["weight_decay"] == 0.0


def test_make_optimizer_passes_the_budget_to_the_store():
    opt = make_optimizer("paged_adamw", make_params(), budget_bytes=600_000, **FACTORY_ARGS)
    assert opt.store.budget_bytes == 600_000


def test_unknown_optimizer_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        make_optimizer("adam8bit", make_params(), **FACTORY_ARGS)
    assert "'adam8bit'" in str(err.value) and all(name in str(err.value) for name in OPTIMIZER_NAMES)


def test_budget_for_an_unpaged_optimizer_is_an_error():
    with pytest.raises(ConfigError, match="paged optimizers only"):
        make_optimizer("adamw", make_params(), budget_bytes=1 << 20, **FACTORY_ARGS)


def test_budget_below_one_parameter_state_names_the_parameter_and_budget():
    with pytest.raises(ConfigError) as err:
        AdamW(make_params(), paged=True, page_budget_bytes=100_000, page_min_size=4096, **HYPER)
    message = str(err.value)
    assert "page_budget_bytes=100,000" in message and "64,000 elements" in message and "512,000 bytes" in message
    assert "(64, 1000)" in message and "page_min_size" in message


def test_budget_is_checked_for_a_parameter_group_added_later():
    opt = AdamW(make_params()[:2], paged=True, page_budget_bytes=300_000, page_min_size=4096, **HYPER)
    with pytest.raises(ConfigError, match="64,000 elements"):
        opt.add_param_group({"params": [make_params([(64, 1000)])[0]]})


@pytest.mark.parametrize(
    "kwargs, field",
    [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1e-8}, "eps"),
     ({"weight_decay": -0.1}, "weight_decay"), ({"optim_bits": 4}, "optim_bits"),
     ({"page_budget_bytes": 1 << 20}, "page_budget_bytes")],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AdamW(make_params(), **{**HYPER, **kwargs})


def _trained(bits=32, shapes=SHAPES):
    params = make_params(shapes)
    opt = AdamW(params, optim_bits=bits, **HYPER)
    run_steps(opt, params, gradients(shapes, 2))
    return opt


def test_state_with_mismatched_shapes_is_refused_before_anything_changes():
    saved = _trained(shapes=[(33, 70), (77, 300), (64, 1000)]).state_dict()
    target = _trained()
    before = target.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(StateDictError) as err:
        target.load_state_dict(saved)
    assert "parameter 1 (shape (300, 77)" in str(err.value) and "(77, 300)" in str(err.value)
    assert torch.equal(target.state_dict()["state"][0]["exp_avg"], before)


def test_8bit_state_loaded_into_a_32bit_optimizer_says_which_setting_differs():
    with pytest.raises(StateDictError, match="the state is 8-bit, this optimizer keeps 32-bit state"):
        _trained(bits=32).load_state_dict(_trained(bits=8).state_dict())


def test_state_for_a_different_number_of_parameters_is_refused():
    with pytest.raises(StateDictError, match="group 0 .* 3 parameters, this optimizer's has 2"):
        _trained(shapes=SHAPES[:2]).load_state_dict(_trained().state_dict())


def test_sparse_gradients_are_refused():
    p = torch.zeros(10, 4, requires_grad=True)
    p.grad = torch.sparse_coo_tensor([[0], [1]], [1.0], (10, 4), check_invariants=True)
    with pytest.raises(ConfigError, match="sparse"):
        AdamW([p], **HYPER).step()
