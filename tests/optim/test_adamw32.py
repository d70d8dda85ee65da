"""32-bit AdamW: bit-identical to torch.optim.AdamW (fp32, CPU), including across a safetensors resume."""

import torch

from qlorakit.optim import AdamW
from tests.helpers.optim import (
    HYPER,
    SHAPES,
    clone_params,
    gradients,
    load_state,
    make_params,
    run_steps,
    save_state,
    ulp_distance,
)


def _groups(params, lr2=3e-3):
    """Two groups: the first with weight decay, the second with another lr and none."""
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr2, "weight_decay": 0.0}]


def test_fp32_equals_torch_adamw_every_step_with_safetensors_resume_midway(tmp_path):
    steps, resume_at = 50, 25
    ours_p, ref_p = make_params(), make_params()
    ours = AdamW(_groups(ours_p), **HYPER)
    ref = torch.optim.AdamW(_groups(ref_p), **HYPER)
    for t, step_grads in enumerate(gradients(SHAPES, steps)):
        for p, q, g in zip(ours_p, ref_p, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_p, ref_p, strict=True):  # tolerance: exact (0 ulp), parameters and both moments
            assert ulp_distance(p, q) == 0
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ours.state[p][name], ref.state[q][name])
        if t + 1 == resume_at:
            save_state(ours, tmp_path / "optimizer.safetensors")
            ours = AdamW(_groups(ours_p, lr2=1.0), **HYPER)  # lr2 is overwritten by the loaded groups
            ours.load_state_dict(load_state(tmp_path / "optimizer.safetensors"))
            assert ours.param_groups[1]["lr"] == 3e-3 and ours.param_groups[1]["betas"] == (0.9, 0.999)
    assert ours.state[ours_p[0]]["step"].item() == steps


def test_loads_a_torch_adamw_state_dict_and_continues_identically():
    grads = gradients(SHAPES, 20)
    ref_p = make_params()
    ref = torch.optim.AdamW(ref_p, **HYPER)
    run_steps(ref, ref_p, grads[:10])
    ours_p = clone_params(ref_p)
    ours = AdamW(ours_p, **HYPER)
    ours.load_state_dict(ref.state_dict())
    run_steps(ref, ref_p, grads[10:])
    run_steps(ours, ours_p, grads[10:])
    assert all(torch.equal(p, q) for p, q in zip(ours_p, ref_p, strict=True))


def test_bf16_parameters_keep_fp32_state_and_round_the_fp32_update():
    p = make_params([(40, 50)])[0]
    p16 = p.detach().to(torch.bfloat16).requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    g = gradients([(40, 50)], 1)[0][0]
    p16.grad, p32.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt16, opt32 = AdamW([p16], **HYPER), AdamW([p32], **HYPER)
    opt16.step()
    opt32.step()
    assert opt16.state[p16]["exp_avg"].dtype == torch.float32
    assert torch.equal(p16, p32.to(torch.bfloat16))
    assert torch.equal(opt16.state[p16]["exp_avg_sq"], opt32.state[p32]["exp_avg_sq"])


def test_parameters_without_gradient_are_left_alone():
    params = make_params()
    before = params[1].detach().clone()
    opt = AdamW(params, **HYPER)
    params[0].grad = torch.ones_like(params[0])
    params[2].grad = torch.ones_like(params[2])
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    assert opt.state[params[0]]["step"].item() == 1


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    p = make_params([(5, 5)])[0]
    opt = AdamW([p], **HYPER)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and opt.state[p]["step"].item() == 1
