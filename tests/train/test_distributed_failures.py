"""Bad input of a multi-process run that needs no second process: a world size that does not divide the
batch, FSDP without a process group. (Ranks that disagree and a dead rank: tests/train/test_distributed.py.)
"""

from __future__ import annotations

import pytest

from qlorakit.errors import ConfigError
from qlorakit.parallel import Dist, Replicas, init_from_env


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    replicas = Replicas(Dist(rank=1, world_size=2, backend="gloo"))
    with pytest.raises(ConfigError, match=r"batch_size = 3 .* not divisible by the world size 2"):
        replicas.per_rank_batch(3)
    assert replicas.share(list(range(10, 16)), 6) == [13, 14, 15]
    assert replicas.share([10, 11], 6) == []  # the short last micro-batch of an epoch: rank 1 gets nothing


def test_fsdp_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="--distributed fsdp needs a process group: start the run with torchrun"):
        init_from_env("fsdp")
    assert not init_from_env("auto").enabled and not init_from_env("ddp").enabled  # one process: nothing changes


def test_a_failed_collective_becomes_a_distributed_error_naming_the_operation_and_the_fix():
    from qlorakit.errors import DistributedError
    from qlorakit.parallel.group import collective

    with pytest.raises(DistributedError, match=r"the all-reduce of x failed: Connection closed by peer\. Another "
                                               r"rank has most likely died or hung \(the group waits at most 7 s"):
        with collective("the all-reduce of x", 7):
            raise RuntimeError("Connection closed by peer\nmore backend detail")
