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


#: Logits of a whole tiny model through a fused path against the unfused reference (fp32): the absolute
#: tolerance is this fraction of the largest reference logit. The fused product sums its terms in another
#: order, so a logit moves by a few ulps of the model's scale, however small the logit itself: on an AVX2-only
#: CPU (AMD EPYC, torch 2.13) two of 2,304 logits near 5e-4 moved by 1.4e-6, 2.7e-6 of the largest (0.53),
#: and failed a fixed 1e-6. A wrong mask moves them by far more (the group masks flipped along the batch: 0.75).
LOGITS_ATOL_OF_MAX = 1e-5


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """``got`` equals ``ref`` within ``rtol`` and ``LOGITS_ATOL_OF_MAX`` of ``ref``'s largest magnitude."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=LOGITS_ATOL_OF_MAX * float(ref.abs().max()))
