"""Failures of a multi-process run: ranks that disagree are refused at start, a dead rank stops the others.

Bad input that needs no second process (a world size that does not divide the batch, FSDP without a
process group) is checked in the same process.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from qlorakit.data import build_datasets, collate_fn
from qlorakit.errors import ConfigError
from qlorakit.parallel import Dist, Replicas, init_from_env
from tests.helpers.distributed import Scenario, read_report, run_ranks
from tests.helpers.train import run_config

#: The dead-rank scenario's process-group timeout: the survivor must stop within about this (it usually
#: stops at once, when gloo sees the closed connection); the test only checks that it stopped at all.
TIMEOUT_S = 20


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


def test_mismatched_ranks_are_refused_and_a_dead_rank_stops_the_others(smol_tokenizer, small_oasst, tmp_path):
    cfg = run_config(small_oasst, tmp_path / "run", batch_size=2, grad_accum=1, max_steps=6)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dist_timeout_s=TIMEOUT_S))
    train_set, val_set, _ = build_datasets(cfg.data, smol_tokenizer)
    scenarios = [Scenario("mismatch", cfg, rank_overrides={1: {"lr": 2e-2}}),
                 Scenario("dead", dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(
                     tmp_path / "dead"))), die_on_rank=1, die_at_forward=5)]
    out = tmp_path / "reports"
    out.mkdir()
    codes = run_ranks(2, (scenarios, train_set, val_set, collate_fn(smol_tokenizer), len(smol_tokenizer), str(out)),
                      timeout_s=240)
    for rank in (0, 1):  # every rank refuses, before any step
        report = read_report(out, "mismatch", rank)
        assert report["type"] == "DistributedError", report
        assert "rank(s) [1] have a config or training data different from rank 0's" in report["error"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert codes[1] == 3  # rank 1 died at its fifth forward pass (2 held-out batches at step 0, then step 3)...
    assert codes[0] == 0, codes  # ... and rank 0 did not hang: it stopped with a clear error
    survivor = read_report(out, "dead", 0)
    assert survivor["type"] == "DistributedError", survivor
    assert "Another rank has most likely died or hung" in survivor["error"]
    assert "--resume" in survivor["error"]
    rows = [json.loads(line) for line in (tmp_path / "dead" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
