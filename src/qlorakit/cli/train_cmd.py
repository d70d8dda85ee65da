"""``qlorakit train``: validate config and data, load the 4-bit model with LoRA, train, report.

With no arguments it fine-tunes the built-in default model on the OASST1 sample bundled with the
package. Everything that can fail on user input (config, output directory, data rows) is checked
before the model is loaded or anything is written.

Exit status: 0 done; 2 an error (the message says why; a run stopped by the numerical guard or a full
disk keeps its last good checkpoint); 130 stopped by SIGINT, 143 by SIGTERM (after writing a checkpoint;
a second Ctrl-C stops at once, keeping the last complete one). Continue a stopped run with ``--resume``;
it starts from the newest checkpoint that verifies (docs/reliability.md).

Under ``torchrun`` (``WORLD_SIZE`` set) every rank runs this command: the process group is joined first,
``--batch-size`` is the micro-batch of the whole job, and rank 0 alone prints the plan and writes the run
directory (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlorakit.cli.config_args import (
    add_config_flags,
    dump_yaml,
    load_config_file,
    run_config_from_args,
)
from qlorakit.config import RunConfig
from qlorakit.constants import FSDP_LOAD_WHOLE
from qlorakit.errors import ConfigError
from qlorakit.fileio import write_text_atomic

#: Overrides that turn the paper's defaults into a run of a few minutes on a laptop CPU; applied
#: only when ``qlorakit train`` gets no data and no step/epoch limit of its own.
QUICKSTART = {"train": {"max_steps": 20, "batch_size": 4, "grad_accum": 1}, "eval": {"eval_steps": 10},
              "data": {"val_size": 32, "source_max_len": 256, "target_max_len": 256},
              "lora": {"r": 16},
              # 20 steps: the fidelity grid's LoRA lr on this model (docs/fidelity.md), not the paper's 2e-4 for
              # 7B-65B over thousands of steps; held-out 2.2379 -> 2.0169 at 1e-3, -> 2.1433 at 2e-4 (issue 14)
              "optim": {"lr": 1e-3}}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a 4-bit model with LoRA adapters",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file with sections model/quant/lora/data/train/optim/memory/eval")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint that verifies against its manifest")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, do not train")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (per-step lines still print)")
    add_config_flags(p)
    p.set_defaults(func=run)


def _is_quickstart(args: argparse.Namespace) -> bool:
    given = {k for k in vars(args) if k.startswith("cfg__")}
    decisive = {"cfg__data__paths", "cfg__train__max_steps", "cfg__train__epochs"}
    return not args.config and not args.resume and not (given & decisive)


def build_config(args: argparse.Namespace) -> tuple[RunConfig, Path | None]:
    """The run's config and, when resuming, the checkpoint to resume from."""
    if args.resume:
        from qlorakit.train.checkpoint import newest_verified

        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a qlorakit run directory?")
        checkpoint, reports = newest_verified(run_dir)
        for line in reports:
            print(line)
        if checkpoint is None:
            why = "every checkpoint fails verification (above)" if reports else "no checkpoint-<step> directory"
            raise ConfigError(f"--resume {run_dir}: {why}; nothing to resume from: start the run again")
        base = load_config_file(run_dir / "config.yaml")
        base.setdefault("train", {})["output_dir"] = str(run_dir)
        base.setdefault("data", {}).setdefault("packing", False)  # a run from before packing resumes unpacked
        return run_config_from_args(args, unshard_for_one_process(base)), checkpoint
    return run_config_from_args(args, QUICKSTART if _is_quickstart(args) else None), None


def unshard_for_one_process(base: dict) -> dict:
    """A resumed ``--distributed fsdp`` run without a launcher continues unsharded (its checkpoints are whole).

    An explicit ``--distributed fsdp`` on the command line still overrides this, and is refused without torchrun.
    """
    from qlorakit.parallel.group import launched

    parallel = base.get("parallel") or {}
    if not launched() and parallel.get("distributed") == "fsdp":
        print("resume     the run was sharded (--distributed fsdp); one process continues it unsharded "
              "from its consolidated checkpoint")
        base = {**base, "parallel": {**parallel, "distributed": "auto"}}
    return base


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty directory without --overwrite, and an unwritable location."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {path} is not empty; pass --overwrite to replace it or choose another --output-dir"
        )
    parent = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {path}: {parent} is not writable")


def run(args: argparse.Namespace) -> int:
    cfg, checkpoint = build_config(args)
    from qlorakit.train.tracking import check_available

    check_available(cfg.train.report_to)  # a missing tracker library fails before anything loads
    cfg, memory_lines = choose_memory(cfg, args, checkpoint)  # before anything large is allocated
    from qlorakit.parallel import Replicas, choose_strategy, process_group

    with process_group(cfg.parallel.distributed, cfg.parallel.dist_timeout_s) as dist_info:
        replicas = Replicas(dist_info)
        strategy = choose_strategy(cfg.parallel.distributed, dist_info, _ddp_fit(cfg, dist_info.world_size))
        return _run(args, cfg, checkpoint, replicas, strategy, memory_lines)


def _ddp_fit(cfg: RunConfig, world: int) -> tuple[bool, str] | None:
    """The planner's verdict on one whole replica per rank (``auto``), or None when it cannot plan the model."""
    if world < 2 or cfg.parallel.distributed != "auto":
        return None
    from qlorakit.planner.budget import default_budget, settings_for
    from qlorakit.planner.distributed import per_rank_plan
    from qlorakit.planner.format import parse_size
    from qlorakit.planner.shapes import model_shape

    try:
        budget = parse_size(cfg.memory.memory_budget) if cfg.memory.memory_budget else default_budget()
        ddp = per_rank_plan(model_shape(cfg.model, cfg.lora.targets), settings_for(cfg), world, "ddp", budget)
    except (ConfigError, OSError, ValueError):
        return None
    return bool(ddp.fits), f"{ddp.total_bytes / 2**30:.2f} GiB planned per rank, budget {budget / 2**30:.2f} GiB"


@dataclasses.dataclass
class _Inputs:
    """What a run reads before any weight loads: the config with its data paths, tokenizer, datasets, collate,
    the preference objective (None for SFT) and the during-training evaluator, all checked."""

    cfg: RunConfig
    run_dir: Path
    tokenizer: Any  # a transformers tokenizer (imported lazily, as are the types below)
    train_set: Any  # data.TokenizedDataset (SFT) or the preference pairs
    val_set: Any
    summary: Any  # data's DataSummary, or PairSummary for pairs
    collate: Callable
    objective: Any  # a train.objective.PreferenceObjective, or None for SFT
    evaluator: Callable | None


def _run(args: argparse.Namespace, cfg: RunConfig, checkpoint: Path | None, replicas, strategy,
         memory_lines: list[str]) -> int:
    from qlorakit.train.rewrites import fix_allocator

    # Before anything large is allocated: set after the model has loaded, the same threshold left the
    # training peak bimodal (docs/memory.md); train()'s rewrite table sets it again (idempotent).
    fix_allocator(cfg)
    inputs = _read_inputs(args, cfg, checkpoint, replicas)
    if replicas.is_main:
        _print_plan(inputs, checkpoint, replicas, strategy, memory_lines)
    if args.dry_run:
        return 0
    return _train_and_finish(args, inputs, checkpoint, replicas, strategy, memory_lines)


def _read_inputs(args: argparse.Namespace, cfg: RunConfig, checkpoint: Path | None, replicas) -> _Inputs:
    from qlorakit.data import build_datasets, collate_fn, default_sample_path
    from qlorakit.eval.during_training import build_training_evaluator
    from qlorakit.models import load_tokenizer

    if not cfg.data.paths:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=(str(default_sample_path()),)))
    run_dir = Path(cfg.train.output_dir)
    if checkpoint is None:
        check_output_dir(run_dir, args.overwrite)
    replicas.per_rank_batch(cfg.train.batch_size)  # a world size that does not divide the batch: refused now
    tokenizer = load_tokenizer(cfg.model)
    if cfg.objective.method == "sft":
        train_set, val_set, summary = build_datasets(cfg.data, tokenizer)
        collate, objective = collate_fn(tokenizer), None
    else:  # dpo / orpo on preference pairs (train.objective, docs/preference.md)
        from qlorakit.train.objective import preference_run_inputs

        train_set, val_set, summary, collate, objective = preference_run_inputs(cfg, tokenizer)
    # perplexity / MMLU inputs checked now
    evaluator = build_training_evaluator(cfg.eval, tokenizer, cfg.train.batch_size)
    return _Inputs(cfg, run_dir, tokenizer, train_set, val_set, summary, collate, objective, evaluator)


def _print_plan(inputs: _Inputs, checkpoint: Path | None, replicas, strategy, memory_lines: list[str]) -> None:
    cfg = inputs.cfg
    print(inputs.summary.format())
    print(_plan(cfg, len(inputs.train_set), len(inputs.val_set), checkpoint))
    if inputs.objective is not None and inputs.objective.note:
        print(inputs.objective.note)
    print("\n".join(memory_lines))
    if strategy is not None:
        loading = f"; 4-bit base loaded by --fsdp-load {cfg.parallel.fsdp_load}" if strategy[0] == "fsdp" else ""
        print(f"parallel   {replicas.world} ranks ({replicas.dist.backend}), {strategy[0]}: {strategy[1]}; "
              f"{cfg.train.batch_size // replicas.world} examples per rank per micro-batch{loading}")


def _train_and_finish(args: argparse.Namespace, inputs: _Inputs, checkpoint: Path | None, replicas, strategy,
                      memory_lines: list[str]) -> int:
    import torch

    from qlorakit.hardware import resolve_dtype
    from qlorakit.train import finish_run, train
    from qlorakit.train.preempt import exit_code

    cfg, run_dir = inputs.cfg, inputs.run_dir
    torch.manual_seed(cfg.train.seed)  # the adapter initialization is part of what the seed fixes
    model = load_for_run(cfg, None if strategy is None else strategy[0], replicas.dist,
                         resolve_dtype(cfg.train.compute_dtype))
    if cfg.full_finetune:
        from qlorakit.train import full

        trained = full.prepare(model)  # every weight trains (train.full)
        if replicas.is_main:
            print(f"finetune   full: {trained:,} values train (embeddings, linears, norms, head)")
    replicas.barrier("the barrier before the run directory is written")  # every rank has checked it
    if checkpoint is None and replicas.is_main:
        _prepare_run_dir(run_dir, args.overwrite)
        why = "".join(f"# {line.strip()}\n" for line in memory_lines)  # the planner's reasons, as comments
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg) + why)
    replicas.barrier("the barrier after the run directory is written")
    try:
        chosen = cfg if strategy is None else dataclasses.replace(  # auto resolved for train(); config.yaml keeps it
            cfg, parallel=dataclasses.replace(cfg.parallel, distributed=strategy[0]))
        result = train(model, inputs.train_set, inputs.val_set, inputs.collate, chosen, run_dir, checkpoint,
                       progress=not args.no_progress, evaluator=inputs.evaluator, objective=inputs.objective)
    except KeyboardInterrupt:
        print(f"stopped at once; {_resume_hint(run_dir)}")
        return exit_code(signal.SIGINT)
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} after step {result.steps}/{result.total_steps}; {_resume_hint(run_dir)}")
        return exit_code(signal.Signals[result.stopped_by])
    if replicas.is_main:  # FSDP: the model is sharded; the last checkpoint has the step's adapter, consolidated
        last = run_dir / f"checkpoint-{result.steps}" / "adapter" if chosen.parallel.distributed == "fsdp" else None
        writer = _model_writer(cfg, model, inputs.tokenizer)  # full fine-tuning: <run>/model instead of <run>/adapter
        print(finish_run(model, inputs.tokenizer, result, inputs.summary, adapter_from=last, write_model=writer))
        if replicas.world > 1:
            print(f"per rank         peak RSS {', '.join(f'{x:.0f}' for x in result.rank_peak_rss_mb)} MiB")
    replicas.barrier("the barrier after the final adapter")
    return 0


def _model_writer(cfg: RunConfig, model, tokenizer):
    """A full fine-tuning run's final model: ``qlorakit merge``'s writer (``models.export.merge_and_export``, fp32,
    with the tokenizer), so ``qlorakit generate --model RUN/model`` and transformers load it; None for LoRA."""
    if not cfg.full_finetune:
        return None
    import torch

    from qlorakit.models.export import merge_and_export

    return lambda out: merge_and_export(model, out, dtype=torch.float32, tokenizer=tokenizer, overwrite=True)


def load_for_run(cfg: RunConfig, strategy: str | None, dist_info, compute_dtype):
    """The 4-bit model with LoRA for this rank. Under ``--distributed fsdp`` each rank ends up with only its own
    rows of every 4-bit linear, loaded as ``--fsdp-load`` says (``parallel.fsdp_load``)."""
    from qlorakit.models import load_model

    if strategy != "fsdp" or cfg.parallel.fsdp_load == FSDP_LOAD_WHOLE:  # full fine-tuning: no adapters
        return load_model(cfg.model, quant=cfg.quant, lora=None if cfg.full_finetune else cfg.lora,
                          compute_dtype=compute_dtype)
    from qlorakit.lora import add_lora
    from qlorakit.parallel.fsdp_load import gathering, load_hooks

    hooks = load_hooks(cfg.parallel.fsdp_load, dist_info)
    with hooks.session():
        model = load_model(cfg.model, quant=cfg.quant, compute_dtype=compute_dtype, hooks=hooks)
    with gathering():  # an adapter initialized from the base weight (DoRA, PiSSA) sees it whole
        add_lora(model, cfg.lora)
    return model


def given_fields(args: argparse.Namespace) -> set[str]:
    """``section.field`` of every setting the user gave: a flag, or a key of the ``--config`` file."""
    given = {dest.removeprefix("cfg__").replace("__", ".") for dest in vars(args) if dest.startswith("cfg__")}
    if args.config:
        values = load_config_file(args.config)
        given |= {f"{section}.{key}" for section, keys in values.items() if isinstance(keys, dict) for key in keys}
    return given


def choose_memory(cfg: RunConfig, args: argparse.Namespace, checkpoint: Path | None) -> tuple[RunConfig, list[str]]:
    """The fastest memory settings that fit the budget (``planner.budget``), for the plan and ``config.yaml``;
    a resumed run keeps its ``config.yaml``'s (its optimizer state has that layout). Raises before any
    weight is loaded when the explicit settings cannot fit."""
    if checkpoint is not None:
        return cfg, ["memory     as in the resumed run's config.yaml (no new choice)"]
    from qlorakit.config import parse_size
    from qlorakit.planner.budget import choose_for_run
    from qlorakit.train import allocator, arena

    cfg, choices = choose_for_run(cfg, given_fields(args), device="cpu",  # qlorakit train loads on the CPU
                                  arena_unavailable=arena.unavailable_reason())
    m = cfg.memory  # the guard the trainer will arm (train.allocator.heap_guard), named in the plan
    armed = allocator.heap_guard(parse_size(m.memory_budget), m.malloc_mmap_threshold_kib, on_cpu=True,
                                 arena=m.arena) is not None
    guard = [f"           heap guard: glibc's threshold is fixed at {allocator.GUARD_THRESHOLD_KIB // 1024} MiB if "
             f"the peak RSS nears the {m.memory_budget} budget (train.allocator)"] if armed else []
    return cfg, choices.lines() + guard


def _resume_hint(run_dir: Path) -> str:
    from qlorakit.train.checkpoint import list_checkpoints

    kept = list_checkpoints(run_dir)
    if not kept:
        return "no checkpoint was written: start the run again"
    return f"the last checkpoint is {kept[-1].name}; continue with: qlorakit train --resume {run_dir}"


def _plan(cfg: RunConfig, n_train: int, n_val: int, checkpoint: Path | None) -> str:
    t, o = cfg.train, cfg.optim
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch(s)"
    lines = [
        f"model      {cfg.model}  ({cfg.quant.quant_type}, blocksize {cfg.quant.blocksize}, "
        f"double quant {cfg.quant.double_quant})",
        ("finetune   full: every weight trains (the lora section is unused); the run ends with a model directory"
         if cfg.full_finetune else
         f"lora       r {cfg.lora.r}, alpha {cfg.lora.alpha}, dropout {cfg.lora.dropout}, targets {cfg.lora.targets}"),
        f"data       {n_train} train / {n_val} held-out examples from {', '.join(cfg.data.paths)}",
        (f"schedule   {steps}, batch {t.batch_size} x {t.grad_accum} accumulation, lr {o.lr} {o.scheduler}, "
        f"warmup {o.warmup_ratio}, clip {o.max_grad_norm}, compute {t.compute_dtype}"),
        _objective_line(cfg),
        (f"packing    rows of {cfg.data.seq_limit} tokens (batch counts rows) if the model passes the packing check "
         "at the start of training" if cfg.data.packing and cfg.objective.method == "sft" else "packing    off"),
        f"output     {t.output_dir}" + (f"  (resuming from {checkpoint.name})" if checkpoint else ""),
        (f"safety     checkpoint {f'every {t.save_steps} steps' if t.save_steps else 'at the end'}, keep "
         f"{t.save_total_limit or 'all'}; "
         f"SIGINT/SIGTERM {'save and exit 130/143' if t.save_on_preempt else 'stop without saving'}; "
         f"stop after {t.max_bad_steps} non-finite steps in a row"),
    ]
    return "\n".join(lines)


def _objective_line(cfg: RunConfig) -> str:
    o = cfg.objective
    detail = {"sft": "token-mean cross-entropy of the answers",
              "dpo": f"DPO sigmoid loss, beta {o.dpo_beta}, reference = base with adapters off ({o.dpo_reference})",
              "orpo": f"ORPO, chosen NLL + {o.orpo_beta} x odds-ratio term, no reference"}[o.method]
    return f"objective  {o.method}: {detail}"


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.is_dir() and any(run_dir.iterdir()) and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
