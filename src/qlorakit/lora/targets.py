"""Which linear layers of a model get quantized and adapted.

A *linear* here is any module with a 2-D ``(out, in)`` weight that acts as ``x @ W.T``: ``nn.Linear``,
``Linear4bit`` and a ``LoraLinear`` wrapping either (its name is the wrapper's). Target specs:

- ``"all-linear"``: every linear inside the repeated decoder blocks — a module path with a numeric
  component such as ``model.layers.3.mlp.up_proj`` — never the output head (``lm_head``) or anything
  outside the blocks. This is the paper's "adapters on every layer".
- a list of names: each matches a module whose path ends with it (``"q_proj"`` or
  ``"layers.0.self_attn.q_proj"``); a name that matches nothing fails listing the names that exist.
- ``"re:<pattern>"``: a regular expression that must match a whole module path.
"""

from __future__ import annotations

import re

from torch import nn

from qlorakit.errors import ConfigError
from qlorakit.quant.linear import Linear4bit

#: Module classes treated as linear layers; a LoRA wrapper is recognised by its ``is_lora_linear`` attribute.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Linear4bit)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES) or getattr(module, "is_lora_linear", False)


def linear_names(model: nn.Module) -> list[str]:
    """Full paths of every linear layer (not descending into a LoRA wrapper's own sub-linears)."""
    names: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if is_linear(child):
                names.append(path)
            else:
                walk(child, path)

    walk(model, "")
    return names


def _in_repeated_block(path: str) -> bool:
    return any(part.isdigit() for part in path.split("."))


def short_names(paths: list[str]) -> list[str]:
    """The distinct last path components, sorted (``q_proj``, ``up_proj``, ...)."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[str]:
    """Module paths selected by ``targets`` (see module docstring), in model order."""
    paths = linear_names(model)
    if isinstance(targets, str) and targets == "all-linear":
        chosen = [p for p in paths if _in_repeated_block(p) and not p.endswith("lm_head")]
        if not chosen:
            raise ConfigError(f"targets 'all-linear' found no linear layer inside repeated blocks; linears: {paths}")
        return chosen
    if isinstance(targets, str) and targets.startswith("re:"):
        pattern = re.compile(targets[3:])
        chosen = [p for p in paths if pattern.fullmatch(p)]
        if not chosen:
            raise ConfigError(f"targets {targets!r} matched no linear layer; names that exist: {short_names(paths)}")
        return chosen
    wanted = (targets,) if isinstance(targets, str) else tuple(targets)
    chosen = []
    for name in wanted:
        hits = [p for p in paths if p == name or p.endswith("." + name)]
        if not hits:
            raise ConfigError(f"target {name!r} matches no linear layer; names that exist: {short_names(paths)}")
        chosen += hits
    return [p for p in paths if p in set(chosen)]
