"""Learning-rate schedules equal the Hugging Face schedules the paper's script used."""

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from qlorakit.optim import lr_at, warmup_steps

HF = {"constant": lambda o, w, t: get_constant_schedule_with_warmup(o, w),
      "cosine": lambda o, w, t: get_cosine_schedule_with_warmup(o, w, t),
      "linear": lambda o, w, t: get_linear_schedule_with_warmup(o, w, t)}


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("total,ratio", [(100, 0.03), (10, 0.0), (1875, 0.03), (7, 0.5)])
def test_schedule_equals_transformers(scheduler, total, ratio):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = HF[scheduler](opt, warmup_steps(total, ratio), total)
    for step in range(total):
        expected = pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        assert lr_at(step, total, 2e-4, scheduler, ratio) == expected
        opt.step()
        sched.step()


def test_paper_warmup_is_three_percent_rounded_up():
    assert warmup_steps(1875, 0.03) == 57
    assert lr_at(0, 1875, 2e-4, "constant", 0.03) == 0.0
    assert lr_at(57, 1875, 2e-4, "constant", 0.03) == 2e-4
