"""Start a small gloo job from a test: N spawned ranks (one thread each) that run named training scenarios.

``run_ranks(world, worker_args, timeout_s)`` starts ``world`` processes with ``multiprocessing``'s spawn context
(not ``torch.multiprocessing.spawn``, which kills the others as soon as one exits: the failure tests need the
survivors to report), waits for them and returns their exit codes (None: still alive at the timeout, then
killed). Each rank runs ``worker``: joins the group through ``qlorakit.parallel.init_from_env`` (as under
torchrun) and runs its scenarios in order; each scenario is a training run of the tiny 4-bit Llama, and
what a rank sees (its error, its adapter) is written under ``out/`` for the test to read.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Scenario:
    """One training run inside the job: ``cfg`` (a RunConfig), optionally resumed, optionally sabotaged."""

    name: str
    cfg: Any
    resume_from: str | None = None  # a checkpoint directory
    rank_overrides: dict[int, dict] = dataclasses.field(default_factory=dict)  # rank -> optim fields changed
    die_on_rank: int | None = None  # this rank exits (os._exit) at its ``die_at_forward``-th forward pass
    die_at_forward: int = 3
    sigterm_on_rank: int | None = None  # this rank sends itself SIGTERM at its first forward pass
    cli_args: list[str] | None = None  # run ``qlorakit train`` with these arguments instead of ``train()``
    copy_from: tuple[str, int] | None = None  # (run dir, step): rank 0 copies it into the output dir (copy_until)
    # first, and every rank resumes from the copy: a resume of a run that this same job wrote
    patches: tuple[tuple[str, str, Any], ...] = ()  # (module, attribute, value) set for the scenario, then restored


def worker(rank: int, world: int, port: int, scenarios: list[Scenario], train_set, val_set, collate,
           vocab_size: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from qlorakit.parallel import init_from_env, shutdown

    timeout = min(s.cfg.parallel.dist_timeout_s for s in scenarios)
    init_from_env("ddp", timeout)
    for scenario in scenarios:
        _run_one(rank, scenario, train_set, val_set, collate, vocab_size, Path(out))
    shutdown()


def _run_one(rank: int, scenario: Scenario, train_set, val_set, collate, vocab_size: int, out: Path) -> None:
    import importlib

    saved = []
    for module, name, value in scenario.patches:
        target = importlib.import_module(module)
        saved.append((target, name, getattr(target, name)))
        setattr(target, name, value)
    try:
        _run_patched(rank, scenario, train_set, val_set, collate, vocab_size, out)
    finally:
        for target, name, value in reversed(saved):
            setattr(target, name, value)


def _run_patched(rank: int, scenario: Scenario, train_set, val_set, collate, vocab_size: int, out: Path) -> None:
    if scenario.copy_from is not None:
        import torch.distributed as dist

        run_dir, step = scenario.copy_from
        target = Path(scenario.cfg.train.output_dir)
        if rank == 0:
            copy_until(Path(run_dir), target, step)
        dist.barrier()
        scenario = dataclasses.replace(scenario, resume_from=str(target / f"checkpoint-{step}"))
    if scenario.cli_args is not None:
        from qlorakit.cli.main import main

        code = main(scenario.cli_args)
        (out / f"{scenario.name}.rank{rank}.json").write_text(json.dumps({"ok": code == 0, "code": code}))
        return
    import torch
    from safetensors.torch import save_file

    from qlorakit.lora import save_adapter
    from qlorakit.parallel.fsdp import whole_model
    from qlorakit.train import train
    from tests.helpers.train import tiny_qlora_model

    cfg = scenario.cfg
    if rank in scenario.rank_overrides:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **scenario.rank_overrides[rank]))
    model = tiny_qlora_model(vocab_size, cfg.lora, seed=0)  # the same base on every rank, as loaded from disk
    torch.manual_seed(100 + rank)
    with torch.no_grad():  # but other adapters on ranks > 0: the trainer must start them all from rank 0's
        for _name, p in model.named_parameters():
            if p.requires_grad and rank > 0:
                p.copy_(torch.randn_like(p) * 0.02)
    if scenario.die_on_rank == rank:
        calls = {"n": 0}

        def die(_module, _args):
            calls["n"] += 1
            if calls["n"] >= scenario.die_at_forward:
                os._exit(3)

        model.get_input_embeddings().register_forward_pre_hook(die)  # every forward pass, eval ones too
    if scenario.sigterm_on_rank == rank:
        sent = []

        def terminate(_module, _args):
            if not sent:
                sent.append(os.kill(os.getpid(), signal.SIGTERM))

        model.get_input_embeddings().register_forward_pre_hook(terminate)
    report = out / f"{scenario.name}.rank{rank}.json"
    started = time.monotonic()
    try:
        resume = Path(scenario.resume_from) if scenario.resume_from else None
        result = train(model, train_set, val_set, collate, cfg, Path(cfg.train.output_dir), resume, progress=False)
        from torch.distributed.tensor import DTensor

        kept_whole = sum(p.requires_grad and not isinstance(p, DTensor) for p in model.parameters())  # FSDP: unsharded
        with whole_model(model):  # FSDP: every block all-gathered after train() (a collective); DDP: nothing to do
            adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            if rank == 0:  # the PEFT files of the model as train() left it (its rewrites undone)
                save_adapter(model, out / f"{scenario.name}.adapter", overwrite=True)
        save_file(adapters, str(out / f"{scenario.name}.rank{rank}.safetensors"))
        report.write_text(json.dumps({"ok": True, "rank_peak_rss_mb": result.rank_peak_rss_mb,
                                      "stopped_by": result.stopped_by, "steps": result.steps,
                                      "losses": result.losses, "kept_whole": kept_whole}))
    except Exception as exc:  # the test reads the error: that is what it checks
        report.write_text(json.dumps({"ok": False, "type": type(exc).__name__, "error": str(exc),
                                      "trace": traceback.format_exc(), "seconds": time.monotonic() - started}))


def run_ranks(world: int, args: tuple, timeout_s: float) -> list[int | None]:
    """Start ``world`` ranks of ``worker(rank, world, port, *args)``; their exit codes (None: killed at timeout)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, world, port, *args), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    codes: list[int | None] = []
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def read_report(out: Path, scenario: str, rank: int) -> dict:
    path = out / f"{scenario}.rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else {"ok": False, "error": "no report (the rank died)"}


# ---- reading a finished run (the equality tests of DDP and FSDP) ----


def metric_rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.jsonl row that has ``key``."""
    from qlorakit.train import read_metrics

    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def assert_close_rows(got: list[tuple[int, float]], want: list[tuple[int, float]], rtol: float) -> None:
    """The same steps, and values equal to ``rtol``."""
    import pytest

    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rtol)


def final_adapter(run_dir: Path) -> dict:
    """The tensors of the newest checkpoint's adapter."""
    from safetensors.torch import load_file

    last = max((p for p in run_dir.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name[11:]))
    return load_file(str(last / "adapter" / "adapter_model.safetensors"))


def copy_until(src: Path, dst: Path, step: int) -> Path:
    """A run directory holding ``src``'s checkpoint-<step> and metrics: the state of a run stopped there."""
    import shutil

    dst.mkdir(parents=True)
    shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst / f"checkpoint-{step}"


def small_oasst_file(shared_dir: Path, path: Path, n: int = 14) -> Path:
    """The rank tests' data: the ``n`` shortest single-turn conversations of the shared OASST1 file, as JSONL."""
    rows = [json.loads(line) for line in (shared_dir / "data" / "oasst1" / "oasst1_guanaco_val.jsonl").open()]
    rows = sorted((r for r in rows if r["input"].count("### Human:") == 1), key=lambda r: len(r["input"] + r["output"]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path
