"""Data parallelism over whole replicas (``--distributed ddp``): the data split, the sums, the gradient all-reduce.

Data rule. The run's ``batch_size`` is the micro-batch of the whole job. The stream of global micro-batches
(``batch_order`` with that size) is the same for every world size, and rank ``r`` of ``N`` takes the
contiguous slice ``indices[r*b : (r+1)*b]``, ``b = batch_size / N``, of the micro-batch at each global
position; so step ``s`` trains on the same examples on 1 process or N (an epoch's last, smaller micro-batch
leaves the last ranks a short or empty share). ``batch_size`` must be divisible by ``N``.

Loss rule. For the ``K = grad_accum`` micro-batches of a step, with ``CE_{r,m}`` the summed cross-entropy of
rank ``r``'s share of micro-batch ``m`` and ``n_{r,m}`` its target tokens:

    N_tok = sum_{r,m} n_{r,m}      (one all-reduce before the forward passes)
    L     = sum_{r,m} CE_{r,m} / N_tok

Each rank backpropagates ``CE_{r,m} / N_tok`` per micro-batch, so after the gradient all-reduce (a SUM) every
rank holds ``dL/dtheta`` of the whole global batch: the token mean of all its target tokens, not a mean of
per-rank or per-micro-batch means.

Why a manual all-reduce of the adapter gradients and not ``torch.nn.parallel.DistributedDataParallel``:
the step's gradients are reduced once, after all ``K`` micro-batches (DDP needs ``no_sync`` on all but the
last); the per-rank losses are already divided by the global token count, so the reduction is a sum (DDP
averages over ranks and would need the factor ``N`` back); a rank with an empty share contributes zeros
without a forward pass (DDP expects every rank to run one); and the model stays the same object (no
``module.`` prefix, the rewrites and the PEFT names unchanged). LoRA gradients are a few MB: one flat buffer
per dtype per step is what DDP's buckets would send; overlapping it with backward would gain little.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
import torch.distributed as dist

from qlorakit.config import RunConfig, as_dict
from qlorakit.errors import ConfigError, DistributedError
from qlorakit.parallel.group import SINGLE, Dist, collective


def run_fingerprint(cfg: RunConfig, lengths: Sequence[int]) -> str:
    """sha256 of the run's config and its training examples' lengths: equal on every rank of a sound job.
    ``memory.memory_budget`` is left out: ``qlorakit train`` fills in each rank's own free memory (its heap guard's
    budget, ``train.allocator``), which differs between ranks of one sound job."""
    config = as_dict(cfg)
    config["memory"].pop("memory_budget", None)  # each rank's own (see above)
    text = json.dumps({"config": config, "train_lengths": list(lengths)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Replicas:
    """The collectives the trainer needs, for ``dist`` (all of them no-ops for one process)."""

    def __init__(self, dist_info: Dist = SINGLE) -> None:
        self.dist = dist_info

    @property
    def world(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def per_rank_batch(self, batch_size: int) -> int:
        """``batch_size / world``; a world size that does not divide the batch is refused."""
        if batch_size % self.world:
            raise ConfigError(
                f"train.batch_size = {batch_size} (the micro-batch of the whole job) is not divisible by the world "
                f"size {self.world}: each rank takes batch_size / world_size examples of every micro-batch. Use a "
                f"multiple of {self.world} (e.g. --batch-size {self.world * max(1, batch_size // self.world)}) or "
                "another number of ranks"
            )
        return batch_size // self.world

    def share(self, indices: Sequence[int], batch_size: int) -> list[int]:
        """This rank's contiguous slice of one global micro-batch's ``indices``."""
        b = self.per_rank_batch(batch_size)
        return list(indices[self.dist.rank * b : (self.dist.rank + 1) * b])

    def _call(self, what: str, fn, *args) -> None:
        with collective(what, self.dist.timeout_s):
            fn(*args)

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64: token counts stay exact)."""
        if not self.dist.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        self._call(f"the all-reduce of {what}", dist.all_reduce, t)
        return t.tolist()

    def max(self, value: int, what: str) -> int:
        """The largest ``value`` over the ranks."""
        if not self.dist.enabled:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        self._call(f"the all-reduce of {what}", dist.all_reduce, t, dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, value: float, what: str) -> list[float]:
        """``value`` of every rank, in rank order."""
        if not self.dist.enabled:
            return [float(value)]
        parts = [torch.zeros(1, dtype=torch.float64, device=self._device()) for _ in range(self.world)]
        self._call(f"the all-gather of {what}", dist.all_gather, parts,
                   torch.tensor([value], dtype=torch.float64, device=self._device()))
        return [float(p) for p in parts]

    def gather_tensors(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """``tensor`` (the same shape and dtype on every rank) of every rank, in rank order, on the CPU."""
        if not self.dist.enabled:
            return [tensor]
        mine = tensor.to(self._device())
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._call(f"the all-gather of {what}", dist.all_gather, parts, mine)
        return [p.cpu() for p in parts]

    def reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, one flat buffer per dtype (a missing grad counts 0)."""
        if not self.dist.enabled:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            self._call("the all-reduce of the adapter gradients", dist.all_reduce, flat)
            offset = 0
            for p in group:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Give every rank rank 0's values (the adapters' initialization, whatever each rank's RNG drew)."""
        if not self.dist.enabled:
            return
        with torch.no_grad():
            for p in params:
                self._call("the broadcast of the initial adapters", dist.broadcast, p.data, 0)

    def check_same(self, fingerprint: str) -> None:
        """Refuse to start when any rank's ``run_fingerprint`` differs from rank 0's (config or data)."""
        if not self.dist.enabled:
            return
        mine = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8, device=self._device())
        parts = [torch.zeros_like(mine) for _ in range(self.world)]
        self._call("the all-gather of the run fingerprints", dist.all_gather, parts, mine)
        digests = [bytes(p.tolist()).hex() for p in parts]
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise DistributedError(
                f"rank {self.dist.rank}: the ranks disagree on the run: rank(s) {odd} have a config or training data "
                f"different from rank 0's (sha256 {digests[odd[0]][:12]} vs {digests[0][:12]}). Start every rank "
                "with the same command, config file and data files"
            )

    def barrier(self, what: str) -> None:
        if self.dist.enabled:
            self._call(what, dist.barrier)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.dist.backend == "nccl" else torch.device("cpu")
