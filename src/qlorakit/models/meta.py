"""Building a model without its weights, and filling it one tensor at a time.

``init_empty_weights()`` makes every ``nn.Parameter`` registered inside it live on the ``meta`` device
(shape and dtype, no storage) while buffers stay real: a rotary ``inv_freq`` is computed in
``__init__`` and is not in the checkpoint, so it must exist after construction. This is accelerate's
``init_empty_weights(include_buffers=False)``, written here so loading does not depend on accelerate.

``set_tensor(model, name, value)`` then replaces one meta parameter by a real one (the
``set_module_tensor_to_device`` idea): the new tensor keeps the parameter's ``requires_grad`` and must
have its shape. ``meta_tensor_names(model)`` lists what is still empty after loading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlorakit.errors import ModelLoadError

_META = torch.device("meta")


@contextmanager
def init_empty_weights() -> Iterator[None]:
    """Inside: parameters are created on the meta device; buffers are created normally."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device != _META:
            registered = module._parameters[name]
            module._parameters[name] = type(registered)(registered.to(_META), requires_grad=registered.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def split_name(name: str) -> tuple[str, str]:
    """``"model.layers.0.mlp.up_proj.weight"`` -> ``("model.layers.0.mlp.up_proj", "weight")``."""
    module_path, _, leaf = name.rpartition(".")
    return module_path, leaf


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name``; its shape must match the placeholder."""
    module_path, leaf = split_name(name)
    module = model.get_submodule(module_path) if module_path else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        _check_shape(name, old, value)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False if old is None else old.requires_grad)
    elif leaf in module._buffers:
        _check_shape(name, module._buffers[leaf], value)
        module._buffers[leaf] = value
    else:
        raise ModelLoadError(f"checkpoint tensor {name!r} has no parameter or buffer in the model")


def _check_shape(name: str, old: torch.Tensor | None, value: torch.Tensor) -> None:
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise ModelLoadError(
            f"checkpoint tensor {name!r} has shape {list(value.shape)} but the model built from config.json expects "
            f"{list(old.shape)}; the config and the weights belong to different models"
        )


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device (tied parameters counted once)."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    names += [n for n, b in model.named_buffers() if b.is_meta]
    return names


def tensor_names(model: nn.Module) -> set[str]:
    """Every parameter and buffer name, including the second name of a tied parameter."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return names | {n for n, _ in model.named_buffers(remove_duplicate=False)}
