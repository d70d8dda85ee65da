"""Helpers shared by the LoRA tests: tiny Llama configs and random adapter weights."""

import torch

from qlorakit.lora import lora_layers

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(hidden_size: int = 64):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )


def randomize_lora_b(model, name: str = "default", std: float = 0.5, seed: int = 99) -> None:
    """Give every B of adapter ``name`` random values, so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                weight = layer.lora_B[name].weight
                weight.copy_(torch.randn(weight.shape, generator=gen) * std)
