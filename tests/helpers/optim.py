"""Helpers for the optimizer tests: parameters with seeded gradients, and a safetensors round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: One tensor below bitsandbytes' 8-bit threshold (4096 elements), two above; none a multiple of 256.
SHAPES = [(33, 70), (300, 77), (64, 1000)]

HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


def make_params(shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_() for shape in shapes]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def gradients(shapes, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients, one per shape, from a fixed seed (heavy-ish tails to exercise absmax)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append([torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4) * 3 for shape in shapes])
    return out


def run_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
              after_step: Callable[[int], None] | None = None) -> None:
    for t, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        if after_step is not None:
            after_step(t)


def save_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Flatten ``state_dict()`` into one safetensors file (as a trainer does): ``state.<index>.<name>``."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{name}": t.detach().cpu().contiguous() for i, entry in sd["state"].items()
               for name, t in entry.items()}
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_state(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        _, index, name = key.split(".", 2)
        state.setdefault(index, {})[name] = value
    return {"state": state, "param_groups": groups}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between fp32 tensors in units in the last place (0 = bit-identical)."""
    def ordered(x):
        bits = x.detach().float().contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return int((ordered(a) - ordered(b)).abs().max())
