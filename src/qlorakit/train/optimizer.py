"""The optimizer of a run: the configured AdamW variant (``optim.make_optimizer``) over the trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qlorakit.config import RunConfig
from qlorakit.errors import ConfigError
from qlorakit.optim import make_optimizer


def build_optimizer(model, cfg: RunConfig, params: Sequence[torch.Tensor] | None = None,
                    whole_numels: Sequence[int] | None = None) -> torch.optim.Optimizer:
    """The configured AdamW variant over the trainable parameters, in model order (or over ``params``; when
    they are FSDP shards, ``whole_numels`` are the whole parameters' sizes)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ConfigError("the model has no trainable parameters; add a LoRA adapter first")
    o = cfg.optim
    budget = o.optim_budget * 2**20 if o.optim_budget else None
    return make_optimizer(o.optim, params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                          weight_decay=o.weight_decay, budget_bytes=budget, whole_numels=whole_numels)
