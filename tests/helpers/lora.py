"""Helpers shared by the LoRA tests: the Llama projection names and random adapter weights."""

import torch

from qlorakit.lora import lora_layers

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora_b(model, name: str = "default", std: float = 0.5, seed: int = 99) -> None:
    """Give every B of adapter ``name`` random values, so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                weight = layer.lora_B[name].weight
                weight.copy_(torch.randn(weight.shape, generator=gen) * std)
