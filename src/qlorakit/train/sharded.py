"""The training loop's FSDP wiring (``--distributed fsdp``, ``parallel.fsdp``): the model sharded after the checkpoint
is loaded, the optimizer rebuilt over this rank's shards, and the chunked loss / preference log-probs run as
forwards of the FSDP root (the chunked head calls the decoder and the head apart, outside the root's own forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qlorakit.config import RunConfig
from qlorakit.parallel import Replicas
from qlorakit.parallel.fsdp import FsdpRun, shard_for_training
from qlorakit.train.loss import chunkable_head, token_loss_sum
from qlorakit.train.optimizer import build_optimizer


def shard_run(model, optimizer, cfg: RunConfig, replicas: Replicas,
              resumed: bool) -> tuple[FsdpRun, torch.optim.Optimizer]:
    """FSDP: the model sharded (``parallel.fsdp``) and the optimizer rebuilt over this rank's shards, with the
    loaded one-process state cut to them."""
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    eight_bit = optimizer.min_8bit_size if getattr(optimizer, "optim_bits", 32) == 8 else None
    sharded = shard_for_training(model, trainable, replicas.world, replicas.dist.rank, trainable[0].dtype, eight_bit)
    whole = sharded.whole_params()
    if whole and replicas.is_main:
        print(f"fsdp       {len(whole)} adapter tensor(s) kept whole on every rank (their 8-bit state blocks would "
              f"straddle two ranks' shards; their gradients are all-reduced), e.g. {whole[0]}")
    full_sd = optimizer.state_dict() if resumed else None
    optimizer = build_optimizer(model, cfg, sharded.locals,  # the same update on this rank's shards, with the
                                [p.numel() for p in sharded.params])  # state kind of the whole parameter
    if full_sd is not None:
        optimizer.load_state_dict(sharded.local_state(full_sd))
    return sharded, optimizer


def fsdp_logps(sharded: FsdpRun, logps: Callable) -> Callable:
    """A preference objective's ``sequence_logps`` for a sharded model (as ``fsdp_loss``; a trainable head is
    scored by the reference path, the root's own forward)."""
    as_root = sharded.root_forward(logps)

    def logps_fn(model, batch: dict[str, torch.Tensor], chunk_tokens: int):
        head = chunkable_head(model)
        if chunk_tokens > 0 and head is not None and not head.weight.requires_grad:
            return as_root(model, batch, chunk_tokens)
        return logps(model, batch, chunk_tokens)

    return logps_fn


def fsdp_loss(sharded: FsdpRun) -> Callable:
    """``token_loss_sum`` for a sharded model: the chunked head as a forward of the FSDP root (it calls the decoder
    and the head apart); the reference loss is the root's own forward already (not nested in another)."""
    as_root = sharded.root_forward(token_loss_sum)

    def loss_fn(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> tuple[torch.Tensor, int]:
        if chunk_tokens > 0 and chunkable_head(model) is not None:
            return as_root(model, batch, chunk_tokens)
        return token_loss_sum(model, batch, chunk_tokens)

    return loss_fn


def uses_fsdp(cfg: RunConfig, replicas: Replicas) -> bool:
    """``--distributed fsdp`` under a process group (the CLI resolves ``auto`` before ``train``)."""
    return replicas.dist.enabled and cfg.parallel.distributed == "fsdp"
