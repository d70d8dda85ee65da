"""Checking a saved AdamW ``state_dict`` against the optimizer it is loaded into, before anything changes.

A state dict is ``{"state": {index: {"step": ..., <tensor name>: tensor, ...}}, "param_groups": [...]}``,
indices counting parameters across groups in order (torch's layout). Indices may be strings (a state
flattened to safetensors and read back). Every mismatch raises ``StateDictError`` naming the parameter,
what was found, what was expected and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qlorakit.errors import StateDictError
from qlorakit.optim.paged import Layout


def describe(index: int, p: torch.Tensor) -> str:
    """``parameter 3 (shape (64, 300), 19,200 elements)``: how errors name a parameter."""
    return f"parameter {index} (shape {tuple(p.shape)}, {p.numel():,} elements)"


def _layout_kind(names: Sequence[str]) -> str:
    return "8-bit" if any(name.endswith("_codes") for name in names) else "32-bit"


def _check_groups(saved: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]) -> None:
    if len(saved) != len(groups):
        raise StateDictError(
            f"optimizer state has {len(saved)} parameter groups, this optimizer {len(groups)}; "
            "build the optimizer with the same parameter groups as the one that was saved"
        )
    for i, (old, new) in enumerate(zip(saved, groups, strict=True)):
        if len(old["params"]) != len(new["params"]):
            raise StateDictError(
                f"parameter group {i} of the optimizer state has {len(old['params'])} parameters, this "
                f"optimizer's has {len(new['params'])}; build it with the same parameters in the same order"
            )


def _check_entry(index: int, p: torch.Tensor, entry: Mapping[str, Any], layout: Layout, bits: int) -> None:
    where = describe(index, p)
    found, expected = sorted(entry), sorted(["step", *layout])
    if found != expected:
        hint = ""
        if _layout_kind(found) != _layout_kind(expected):
            hint = f" (the state is {_layout_kind(found)}, this optimizer keeps {_layout_kind(expected)} state " \
                   f"for it: optim_bits={bits}; build the optimizer with the settings it was saved with)"
        raise StateDictError(f"optimizer state for {where} has keys {found}, expected {expected}{hint}")
    for name, (shape, dtype) in layout.items():
        value = entry[name]
        if not isinstance(value, torch.Tensor):
            raise StateDictError(f"optimizer state {name!r} for {where} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(shape):
            raise StateDictError(
                f"optimizer state {name!r} for {where} has shape {tuple(value.shape)}, expected {tuple(shape)}; "
                "the state was saved for different parameters — load it into an optimizer built over the "
                "same parameters in the same order"
            )
        if dtype == torch.uint8 and value.dtype != torch.uint8:
            raise StateDictError(f"optimizer state {name!r} for {where} has dtype {value.dtype}, expected uint8 codes")
        if dtype != torch.uint8 and not value.is_floating_point():
            raise StateDictError(f"optimizer state {name!r} for {where} has dtype {value.dtype}, expected float32")
    step = entry["step"]
    if float(step) < 0 or float(step) != int(float(step)):
        raise StateDictError(f"optimizer state 'step' for {where} is {float(step)}, expected a whole number >= 0")


def checked_state(
    state_dict: Mapping[str, Any],
    groups: Sequence[Mapping[str, Any]],
    params: Sequence[torch.Tensor],
    layouts: Sequence[Layout],
    bits: int,
) -> dict[int, Mapping[str, Any]]:
    """Validate ``state_dict`` for these parameters; return its per-parameter entries keyed by int index."""
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise StateDictError(f"an optimizer state dict needs 'state' and 'param_groups', got keys {sorted(state_dict)}")
    _check_groups(state_dict["param_groups"], groups)
    entries: dict[int, Mapping[str, Any]] = {}
    for key, entry in state_dict["state"].items():
        index = int(key)
        if not 0 <= index < len(params):
            raise StateDictError(
                f"optimizer state for parameter {index}, but this optimizer has {len(params)} parameters "
                f"(indices 0..{len(params) - 1})"
            )
        _check_entry(index, params[index], entry, layouts[index], bits)
        entries[index] = entry
    return entries
