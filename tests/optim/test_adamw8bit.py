"""8-bit AdamW against bitsandbytes' AdamW8bit on CPU (bitsandbytes 0.50.2).

Tolerances (measured over 5 seeds x 3 learning rates, 50 steps):
- parameters with >= 4096 elements (8-bit state): codes, absmax and parameters bit-identical;
- the 2,310-element parameter (32-bit state in both): |ours - bnb| <= 1e-6 (measured max 3.6e-7, i.e. a
  few ulps of |p| <= 4): ours follows torch.optim.AdamW's operation order, while bitsandbytes' CPU 32-bit
  kernel computes ``m / (sqrt(v) + eps * sqrt(1 - b2^t))`` scaled by ``-lr * sqrt(1 - b2^t) / (1 - b1^t)``
  and updates ``m`` with ``mul_ + add_`` instead of ``lerp_``.
"""

import pytest
import torch

from qlorakit.optim import AdamW
from qlorakit.optim.state8bit import num_blocks
from tests.helpers.optim import (
    HYPER,
    SHAPES,
    clone_params,
    gradients,
    load_state,
    make_params,
    run_steps,
    save_state,
)

bnb = pytest.importorskip("bitsandbytes")

SMALL_ATOL = 1e-6


def _zero_some_blocks(grads):
    """LoRA's A gets a zero gradient while B is still zero: zero whole and partial blocks early on."""
    for step_grads in grads[:3]:
        step_grads[1].view(-1)[:700] = 0
        step_grads[2].view(-1)[-300:] = 0
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_state_and_parameters_equal_bitsandbytes_adamw8bit(dtype):
    grads = _zero_some_blocks(gradients(SHAPES, 50))
    ours_p = [p.detach().to(dtype).requires_grad_() for p in make_params()]
    ref_p = clone_params(ours_p)
    ours = AdamW(ours_p, optim_bits=8, **HYPER)
    ref = bnb.optim.AdamW8bit(ref_p, **HYPER)

    def compare(t):
        for i, (p, q) in enumerate(zip(ours_p, ref_p, strict=True)):
            mine, theirs = ours.state[p], ref.state[q]
            if i == 0:  # < 4096 elements: 32-bit state in both
                assert theirs["state1"].dtype == torch.float32 and mine["exp_avg"].dtype == torch.float32
                assert (p.float() - q.float()).abs().max() <= (SMALL_ATOL if dtype == torch.float32 else 1e-2)
                continue
            assert torch.equal(mine["exp_avg_codes"], theirs["state1"]), (t, i)
            assert torch.equal(mine["exp_avg_sq_codes"], theirs["state2"]), (t, i)
            assert torch.equal(mine["exp_avg_absmax"], theirs["absmax1"]), (t, i)
            assert torch.equal(mine["exp_avg_sq_absmax"], theirs["absmax2"]), (t, i)
            assert torch.equal(p, q), (t, i)

    for t, step_grads in enumerate(grads):
        for p, q, g in zip(ours_p, ref_p, step_grads, strict=True):
            p.grad, q.grad = g.to(dtype), g.to(dtype)
        ours.step()
        ref.step()
        compare(t)


def test_8bit_state_costs_two_bytes_per_parameter_plus_block_scales():
    params = make_params()
    opt = AdamW(params, optim_bits=8, **HYPER)
    run_steps(opt, params, gradients(SHAPES, 1))
    small, large = params[0].numel(), [p.numel() for p in params[1:]]
    expected = 8 * small + sum(2 * n + 2 * 4 * num_blocks(n) for n in large)
    assert opt.state_nbytes() == {"unpaged": expected, "paged": 0, "paged_resident": 0}


def test_8bit_resume_through_safetensors_continues_bit_identically(tmp_path):
    grads = gradients(SHAPES, 30)
    straight_p, resumed_p = make_params(), make_params()
    straight = AdamW(straight_p, optim_bits=8, **HYPER)
    run_steps(straight, straight_p, grads)
    first = AdamW(resumed_p, optim_bits=8, **HYPER)
    run_steps(first, resumed_p, grads[:12])
    save_state(first, tmp_path / "optimizer.safetensors")
    second = AdamW(resumed_p, optim_bits=8, **HYPER)
    second.load_state_dict(load_state(tmp_path / "optimizer.safetensors"))
    run_steps(second, resumed_p, grads[12:])
    assert all(torch.equal(p, q) for p, q in zip(straight_p, resumed_p, strict=True))
    for p, q in zip(straight_p[1:], resumed_p[1:], strict=True):
        assert torch.equal(straight.state[p]["exp_avg_codes"], second.state[q]["exp_avg_codes"])
