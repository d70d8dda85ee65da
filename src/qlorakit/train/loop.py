"""The training loop, top to bottom: micro-batches -> token-mean loss -> clipped AdamW step -> log/eval/save.

Loss of one optimizer step over its ``grad_accum`` micro-batches (QLoRA trains on response tokens only):

    L = sum_{micro m} sum_{target tokens t in m} CE(logits_t, label_t) / N,   N = all target tokens of the step

i.e. the mean over the target tokens of the whole accumulated batch, not a mean of per-micro-batch
means. Each micro-batch backpropagates its share ``sum_m CE / N``, so the summed gradient is exactly
the gradient of ``L``.

The data is one stream of micro-batches across epochs: epoch ``e`` is ``batch_order(..., epoch=e)``, and
the trainer's only data position is ``micro_index`` (micro-batches consumed), so resuming from a
checkpoint continues the same stream, even across an epoch boundary. With packing (``train.packed``) the
items of the stream are packed rows, which depend only on the data and ``max_seq_len``, so this still holds.

Read it in order: ``train`` applies the rewrites (``train.rewrites``) and installs the stop signals
(``train.preempt``), ``_start`` builds the ``Run`` (the state every step reads and updates), and ``step`` is
one optimizer step, one commented line per phase: lr, micro-batches, forward/backward, clip, guard,
optimizer step, log, divergence, eval/save. Around it: ``train.loss`` (the step's loss), ``train.optimizer``,
``train.sharded`` (FSDP's wiring) and ``train.step_log`` (the metrics row).

Several processes (``torchrun``; ``qlorakit.parallel``): ``batch_size`` is the micro-batch of the whole job,
each rank takes its slice of every global micro-batch, ``N`` above is all-reduced over the ranks and the adapter
gradients are summed, so every rank takes the same update as one process with the whole batch would; rank 0
writes the run directory. The data and loss rules are in ``parallel.replicas``'s docstring. With
``--distributed fsdp`` (``parallel.fsdp``) the model is sharded after the checkpoint is loaded, the gradients
are reduce-scattered (a sum) after the last micro-batch, the optimizer steps the local shards, and a save
gathers everything whole first.

The numerical guard: a step whose loss or gradient norm is not finite skips its update (no optimizer
step; the gradients are dropped) but still counts as a step and keeps its micro-batches consumed, so the
schedule, the data position (``micro_index = step * grad_accum``) and a resume stay exactly as in a run
without the fault. ``train.max_bad_steps`` such steps in a row stop the run with ``TrainingDivergedError``;
no periodic checkpoint is written at a skipped step, so the last one before the streak stays.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlorakit.config import RunConfig, as_dict, parse_size
from qlorakit.constants import LOSS_CHUNK_TOKENS
from qlorakit.data import batch_order
from qlorakit.data.packing import real_tokens
from qlorakit.errors import TrainingDivergedError
from qlorakit.fileio import remove_stale
from qlorakit.hardware import peak_rss_mb
from qlorakit.optim import lr_at
from qlorakit.parallel import Replicas, current, run_fingerprint
from qlorakit.parallel.fsdp import Consolidated, FsdpRun
from qlorakit.parallel.fsdp_load import gathering
from qlorakit.train import allocator, arena, full, rewrites
from qlorakit.train.checkpoint import (
    TrainerState,
    check_free_space,
    list_checkpoints,
    load_checkpoint,
    rank_rng_key,
    save_checkpoint,
)
from qlorakit.train.faults import pause_point
from qlorakit.train.loss import target_tokens, token_loss_sum
from qlorakit.train.metrics import MetricsLog, NoLog
from qlorakit.train.optimizer import build_optimizer
from qlorakit.train.packed import pack_for_training
from qlorakit.train.preempt import StopSignals
from qlorakit.train.sharded import fsdp_logps, fsdp_loss, shard_run, uses_fsdp
from qlorakit.train.step_log import log_step


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    tokens: int
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    total_steps: int = 0
    bad_steps: int = 0  # updates skipped by the numerical guard, in the whole run
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a stop signal ended the run early (with a checkpoint)
    rank_peak_rss_mb: list[float] = field(default_factory=list)  # every rank's peak RSS, in rank order

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


class MicroBatchStream:
    """Micro-batches of index lists, epoch after epoch, addressed by a global position."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool) -> None:
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group_by_length
        self._epoch, self._order = -1, []
        self.per_epoch = len(self._epoch_order(0))

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batch_order(self.lengths, self.batch_size, self.seed, epoch, self.group)
        return self._order

    def at(self, position: int) -> tuple[int, list[int]]:
        """(epoch, indices) of the micro-batch at global ``position``."""
        epoch, offset = divmod(position, self.per_epoch)
        return epoch, self._epoch_order(epoch)[offset]


def evaluate(model, dataset: Sequence[dict], collate: Callable, batch_size: int, device,
             chunk_tokens: int = LOSS_CHUNK_TOKENS, loss_fn: Callable = token_loss_sum) -> tuple[float, int]:
    """Token-weighted mean loss over ``dataset`` (eval mode, no grad); ``loss_fn``: ``token_loss_sum`` or the
    FSDP root's forward around it (``Run.loss_fn``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = _to(collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]), device)
            loss, n = loss_fn(model, batch, chunk_tokens)
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1), count


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # (FSDP's empty_share mark)


def total_steps_for(cfg: RunConfig, micro_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))


@dataclass
class Run:
    """Everything one training run carries from step to step (built once by ``_start``)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_set: Sequence[dict]
    val_set: Sequence[dict]
    collate: Callable
    stream: MicroBatchStream
    cfg: RunConfig
    device: torch.device
    state: TrainerState  # step, data position, tokens, time: what a checkpoint saves
    log: MetricsLog
    result: TrainResult
    run_dir: Path
    last_step: int  # this session ends after this step (total_steps, or earlier with stop_after_steps)
    stop: StopSignals  # the first SIGINT/SIGTERM received, if any
    evaluator: Callable[[torch.nn.Module], dict] | None = None
    replicas: Replicas = field(default_factory=Replicas)  # the other ranks (a no-op for one process)
    stop_agreed: int = 0  # several ranks: the stop signal that reached some rank before this step's all-reduce

    @property
    def stopping(self) -> bool:
        """Whether this session ends after the current step: the signal itself, or the ranks' agreement on it."""
        return self.stop_agreed > 0 if self.replicas.dist.enabled else self.stop.requested

    @property
    def stopped_by(self) -> str | None:
        """The stop signal's name: this rank's own, or the one another rank received."""
        return self.stop.name or (signal.Signals(self.stop_agreed).name if self.stop_agreed else None)
    objective: object | None = None  # a train.objective.PreferenceObjective for dpo / orpo; None = SFT
    train_collate: Callable | None = None  # packed rows' collate (train.packed); None: ``collate``
    padding_fraction: float = 0.0  # padding share of the last step's micro-batches (this rank)
    fsdp: FsdpRun | None = None  # --distributed fsdp: the sharded model's handles (parallel.fsdp); None: DDP / 1
    # (model, batch, chunk_tokens) -> (CE sum, target tokens). FSDP: run as a forward of the root, since the chunked
    # head calls the decoder and the head apart, outside the root's own forward (FsdpRun.root_forward)
    loss_fn: Callable = token_loss_sum
    heap_guard: allocator.HeapGuard | None = None  # glibc's dynamic threshold under a budget (train.allocator)


def train(
    model,
    train_set: Sequence[dict],
    val_set: Sequence[dict],
    collate: Callable,
    cfg: RunConfig,
    run_dir: Path,
    resume_from: Path | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    evaluator: Callable[[torch.nn.Module], dict] | None = None,
    objective=None,
) -> TrainResult:
    """Train ``model``'s trainable parameters (LoRA adapters; every weight with ``train.finetune: full``, the
    model made trainable by ``train.full.prepare`` first); see the module docstring for the loss.

    ``resume_from`` is a ``checkpoint-<step>`` directory; ``stop_after_steps`` ends this session early
    (after that many updates, with a checkpoint) as an interruption would, for time-boxed jobs.
    ``evaluator(model)`` (e.g. ``qlorakit.eval.during_training``) returns extra metrics (perplexity, MMLU)
    logged with the step at each evaluation after a step. A SIGINT/SIGTERM (``cfg.train.save_on_preempt``)
    ends the session after the current step and its checkpoint, with ``TrainResult.stopped_by`` set
    (``train.preempt``). ``objective`` (``train.objective.PreferenceObjective``) replaces the SFT loss with DPO /
    ORPO on pairs (``data.pairs``); everything else in the loop stays the same.
    """
    run_dir = Path(run_dir)
    replicas = Replicas(current(cfg.parallel.dist_timeout_s))  # rank 0 alone writes the run directory
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in remove_stale(run_dir) if replicas.is_main else ():  # what a killed run left: .checkpoint-N.tmp-PID
        print(f"removed {name} (left by a process that no longer runs)")
    with rewrites.apply(model, cfg) as applied, StopSignals(cfg.train.save_on_preempt) as stop:
        if replicas.is_main:
            applied.report(run_dir)  # every model/process rewrite, listed and logged (train.rewrites)
        run = _start(model, train_set, val_set, collate, cfg, run_dir, resume_from=resume_from,
                     stop_after_steps=stop_after_steps, evaluator=evaluator, stop=stop, replicas=replicas)
        if objective is not None:  # DPO's cached reference log-probs are scored here, before step 0 (each rank
            run.objective = objective  # scores every pair, and evaluates every held-out pair: replicas agree)
            if run.fsdp is not None:  # the chunked head as a forward of the FSDP root, as for SFT
                objective.logps = fsdp_logps(run.fsdp, objective.logps)
            prepared = objective.prepare(model, [train_set, val_set], collate, run.device)
            if prepared:
                run.log.write({"step": run.state.step, **prepared})
        if val_set and resume_from is None:
            _eval_and_log(run)  # the held-out loss before any update (step 0)
        model.train()
        state = run.state
        with tqdm(total=state.total_steps, initial=state.step, desc="train", unit="step",
                  disable=not progress or not replicas.is_main) as bar:
            while state.step < run.last_step:
                step(run, bar)
                if run.stopping:  # step() has written the checkpoint
                    break
        arena.trim()  # the steps' freed blocks go back to the OS before the summary, plot and exports allocate
        if run.stopping and state.step < run.last_step:
            run.result.stopped_by = run.stopped_by
        run.log.close()  # the trackers' runs end (metrics.jsonl is flushed row by row)
    run.result.steps, run.result.tokens, run.result.train_seconds = state.step, state.tokens, state.elapsed_s
    run.result.total_steps, run.result.bad_steps = state.total_steps, state.bad_steps
    run.result.peak_rss_mb = peak_rss_mb()
    run.result.rank_peak_rss_mb = replicas.gather(run.result.peak_rss_mb, "the peak RSS of every rank")
    return run.result


def _start(model, train_set, val_set, collate, cfg: RunConfig, run_dir: Path, *, resume_from: Path | None,
           stop_after_steps: int | None, evaluator, stop: StopSignals, replicas: Replicas) -> Run:
    """The run's state: optimizer, data stream, trainer state (fresh and seeded, or from a checkpoint), log;
    fails before the first step when one checkpoint does not fit on the disk, or when the ranks disagree."""
    device = next(p for p in model.parameters()).device
    train_collate = None
    if cfg.objective.method == "sft":  # preference pairs are never packed
        with gathering():  # a base loaded sharded (--fsdp-load) all-gathers each layer for the probe's forwards
            train_set, train_collate = pack_for_training(model, train_set, collate, cfg, run_dir, replicas.is_main)
    lengths = train_set.lengths if hasattr(train_set, "lengths") else [len(x["input_ids"]) for x in train_set]
    replicas.per_rank_batch(cfg.train.batch_size)  # a world size that does not divide the batch is refused
    replicas.check_same(run_fingerprint(cfg, lengths))  # every rank has the same config and data
    stream = MicroBatchStream(lengths, cfg.train.batch_size, cfg.data.seed, cfg.data.group_by_length)
    if cfg.full_finetune:
        full.check_prepared(model)  # every weight trains: no LoRA or 4-bit layer, nothing frozen (train.full)
    optimizer = build_optimizer(model, cfg)
    replicas.broadcast_params([p for g in optimizer.param_groups for p in g["params"]])  # rank 0's adapters
    rank = replicas.dist.rank
    state = (load_checkpoint(resume_from, model, optimizer, rank, full=cfg.full_finetune) if resume_from is not None
             else TrainerState())
    sharded = None
    if uses_fsdp(cfg, replicas):  # the one-process model and checkpoint are loaded: now shard them
        sharded, optimizer = shard_run(model, optimizer, cfg, replicas, resumed=resume_from is not None)
    if resume_from is None:  # rank 0 draws the one-process stream; every other rank its own (dropout masks)
        torch.manual_seed(cfg.train.seed + rank)
    state.total_steps = total_steps_for(cfg, stream.per_epoch)
    resume_step = state.step if resume_from is not None else None
    log = (MetricsLog(run_dir, resume_step=resume_step, report_to=cfg.train.report_to, config=as_dict(cfg))
           if replicas.is_main else NoLog())
    result = TrainResult(run_dir=run_dir, steps=state.step, tokens=state.tokens, train_seconds=state.elapsed_s)
    last_step = state.total_steps if stop_after_steps is None else min(state.total_steps, state.step + stop_after_steps)
    at_once = _checkpoints_at_once(cfg, state.total_steps)
    warning = check_free_space(run_dir, model, at_once) if replicas.is_main else None
    if warning:
        print(warning)
    return Run(model=model, optimizer=optimizer, train_set=train_set, val_set=val_set, collate=collate, stream=stream,
               cfg=cfg, device=device, state=state, log=log, result=result, run_dir=run_dir, last_step=last_step,
               stop=stop, evaluator=evaluator, replicas=replicas, train_collate=train_collate, fsdp=sharded,
               loss_fn=token_loss_sum if sharded is None else fsdp_loss(sharded),
               heap_guard=allocator.heap_guard(parse_size(cfg.memory.memory_budget) if cfg.memory.memory_budget
                                               else None, cfg.memory.malloc_mmap_threshold_kib, device.type == "cpu",
                                               arena=cfg.memory.arena))


def _checkpoints_at_once(cfg: RunConfig, total_steps: int) -> int:
    """Checkpoints on the disk at the peak of a save: the kept ones plus the one being written."""
    t = cfg.train
    saves = total_steps // t.save_steps + 1 if t.save_steps else 1
    return min(t.save_total_limit or saves, saves) + 1


def step(run: Run, bar: tqdm) -> None:
    """One optimizer step, phase by phase (``bar``: the progress display)."""
    started = time.perf_counter()
    # lr: the schedule's value at this step, for every parameter group
    _set_lr(run)
    # micro-batches: the next grad_accum of the stream; the data position (state.micro_index) moves here
    batches = _next_micro_batches(run)
    # forward/backward: each micro-batch backpropagates its share of the step's token-mean loss
    loss, step_tokens = _forward_backward(run, batches)
    # clip: the global gradient norm to max_grad_norm (its value is logged either way)
    grad_norm = (_clip(run.optimizer, run.cfg.optim.max_grad_norm) if run.fsdp is None
                 else run.fsdp.clip(run.cfg.optim.max_grad_norm))  # FSDP: the norm over every rank's shards
    # guard: a non-finite loss or gradient norm skips this update; its micro-batches stay consumed
    skipped = _guard(run.state, loss, grad_norm)
    # optimizer step: update the adapters (unless skipped), drop the gradients, count the step
    _update(run, skipped)
    seconds = time.perf_counter() - started
    _count_step(run.state, step_tokens, seconds)
    # heap guard: with glibc's dynamic threshold, the fixed one once the peak nears the budget (train.allocator)
    guarded = run.heap_guard.after_step(run.state.step) if run.heap_guard is not None else None
    # log: a metrics row every logging_steps (at the last step, at a skipped one, at the guard's switch), the bar
    log_step(run, bar, loss, grad_norm, step_tokens / seconds, skipped, guarded)
    # divergence: max_bad_steps skipped updates in a row stop the run with an error (the last good checkpoint stays)
    _stop_if_diverged(run, skipped)
    # eval/save: held-out loss and extra metrics every eval_steps and at the end; a checkpoint every save_steps
    # (not at a skipped step), at the end, and after a stop signal
    _maybe_eval_and_save(run)


def _set_lr(run: Run) -> None:
    o, s = run.cfg.optim, run.state
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(s.step, s.total_steps, o.lr, o.scheduler, o.warmup_ratio)


def _next_micro_batches(run: Run) -> list[dict[str, torch.Tensor] | None]:
    """This rank's share of each (None: an empty share of an epoch's short last micro-batch)."""
    batches = []
    collate = run.train_collate or run.collate
    for _ in range(run.cfg.train.grad_accum):
        _, indices = run.stream.at(run.state.micro_index)
        indices = run.replicas.share(indices, run.cfg.train.batch_size)
        batches.append(collate([run.train_set[i] for i in indices]) if indices else None)
        if run.fsdp is not None and not indices:  # FSDP: every rank runs every micro-batch's collectives, so an
            batches[-1] = {**collate([run.train_set[0]]), "empty_share": True}  # empty share runs one, weight 0
        run.state.micro_index += 1
    return batches


def _forward_backward(run: Run, batches: list[dict[str, torch.Tensor] | None]) -> tuple[float, int]:
    """Backward of ``sum_m CE_m / N`` per micro-batch (N: the step's target tokens, of all ranks); returns the
    step's (loss, input tokens without padding), summed over the ranks, whose adapter gradients are summed too;
    sets ``run.padding_fraction`` (this rank's micro-batches)."""
    replicas, batches = run.replicas, [b for b in batches if b is not None]
    if run.objective is not None:  # DPO / ORPO: the mean loss over the step's pairs, of all ranks (train.objective)
        total, tokens = run.objective.forward_backward(run.model, [_to(b, run.device) for b in batches],
                                                       run.train_set, replicas.sum if replicas.dist.enabled else None,
                                                       None if run.fsdp is None else run.fsdp.sync_gradients)
    else:
        n_target = sum(target_tokens(b) for b in batches if "empty_share" not in b)
        if replicas.dist.enabled:
            n_target = int(replicas.sum([n_target], "the step's target-token count")[0])
        n_target = max(n_target, 1)
        total, tokens, slots = 0.0, 0, 0
        for i, batch in enumerate(batches):
            empty = batch.pop("empty_share", False)  # an FSDP rank's empty share: collectives only, weight 0
            batch = _to(batch, run.device)
            if run.fsdp is not None:  # reduce-scatter the summed gradients once, after the last micro-batch
                run.fsdp.sync_gradients(i == len(batches) - 1)
            loss_sum, _ = run.loss_fn(run.model, batch, run.cfg.memory.loss_chunk_tokens)
            if empty:
                loss_sum = loss_sum * 0.0
            (loss_sum / n_target).backward()
            if empty:
                continue
            total += float(loss_sum.detach()) / n_target
            tokens, slots = tokens + real_tokens(batch), slots + batch["input_ids"].numel()
        run.padding_fraction = 1.0 - tokens / max(slots, 1)
    if run.fsdp is not None:
        run.fsdp.grads_to_local()  # FSDP reduce-scattered them: the optimizer's local shards get their parts
    elif replicas.dist.enabled:
        replicas.reduce_grads([p for g in run.optimizer.param_groups for p in g["params"]])
    if replicas.dist.enabled:
        total, tokens = replicas.sum([total, tokens], "the step's loss and tokens")
        tokens, run.stop_agreed = int(tokens), replicas.max(run.stop.signum or 0, "the stop signals")
    return total, tokens


def _clip(optimizer, max_norm: float) -> float:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def _guard(state: TrainerState, loss: float, grad_norm: float) -> str | None:
    """Why this step's update must be skipped (a non-finite loss or gradient norm), or None; counts it."""
    reason = None
    if not math.isfinite(loss):
        reason = f"non-finite loss ({loss})"
    elif not math.isfinite(grad_norm):
        reason = f"non-finite gradient norm ({grad_norm})"
    state.bad_steps += reason is not None
    state.bad_streak = state.bad_streak + 1 if reason else 0
    return reason


def _update(run: Run, skipped: str | None) -> None:
    pause_point("before-optimizer-step", f"step-{run.state.step + 1}")
    if skipped is None:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.fsdp is not None:
        run.fsdp.zero_grad()


def _stop_if_diverged(run: Run, skipped: str | None) -> None:
    state, limit = run.state, run.cfg.train.max_bad_steps
    if skipped is None or state.bad_streak < limit:
        return
    kept = list_checkpoints(run.run_dir)
    good = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    raise TrainingDivergedError(
        f"steps {state.step - limit + 1}-{state.step}: {limit} optimizer steps in a row had a non-finite loss or "
        f"gradient norm (the last: {skipped}); their updates were skipped and the run stops (--max-bad-steps "
        f"{limit}). The adapters are unchanged since the last good step and {good}: resume from it with a lower "
        "--lr, a --max-grad-norm, or --compute-dtype float32; metrics.jsonl marks the skipped steps."
    )


def _count_step(state: TrainerState, step_tokens: int, seconds: float) -> None:
    state.step, state.tokens, state.elapsed_s = state.step + 1, state.tokens + step_tokens, state.elapsed_s + seconds


def _maybe_eval_and_save(run: Run) -> None:
    t, every, state = run.cfg.train, run.cfg.eval.eval_steps, run.state
    evaluate_now = (every and state.step % every == 0) or state.step == state.total_steps
    if run.val_set and evaluate_now:
        _eval_and_log(run)
    if run.evaluator is not None and evaluate_now:
        run.log.write({"step": state.step, **run.evaluator(run.model)})
    periodic = t.save_steps and state.step % t.save_steps == 0 and state.bad_streak == 0
    if periodic or state.step == run.last_step or run.stopping:
        rank_rng = _rank_rng(run.replicas)  # every rank's generators, for rank 0 to save
        if run.fsdp is not None:  # consolidated: the adapter and the optimizer state gathered whole, on every rank
            with run.fsdp.unsharded():
                optimizer = Consolidated(run.fsdp.full_state(run.optimizer))
                if run.replicas.is_main:
                    run.log.sync()
                    save_checkpoint(run.run_dir, run.model, optimizer, state, t.save_total_limit, rank_rng,
                                    full=run.cfg.full_finetune)
        elif run.replicas.is_main:  # the replicas are equal: rank 0's state is the whole (consolidated) checkpoint
            run.log.sync()  # the rows up to this step reach the disk before the checkpoint that implies them
            save_checkpoint(run.run_dir, run.model, run.optimizer, state, t.save_total_limit, rank_rng,
                            full=run.cfg.full_finetune)
        run.replicas.barrier(f"the barrier after checkpoint-{state.step}")


def _rank_rng(replicas: Replicas) -> dict[str, torch.Tensor]:
    """The generator states of ranks 1..N-1 under their checkpoint keys (empty for one process)."""
    if not replicas.dist.enabled:
        return {}
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    out = {}
    for name, mine in states.items():
        for rank, theirs in enumerate(replicas.gather_tensors(mine, "the generator states")):
            if rank:
                out[rank_rng_key(name, rank)] = theirs
    return out


def _eval_and_log(run: Run) -> None:
    if run.objective is not None:  # eval_loss and eval_rewards/... over the held-out pairs
        metrics = run.objective.evaluate(run.model, run.val_set, run.collate, run.device)
        run.result.eval_losses.append((run.state.step, metrics["eval_loss"]))
        run.log.write({"step": run.state.step, **metrics})
        return
    replicas, batch_size = run.replicas, run.cfg.train.batch_size
    if run.fsdp is not None:  # every rank scores every example: the same forward passes (FSDP's all-gathers)
        loss, count = evaluate(run.model, run.val_set, run.collate, batch_size, run.device, loss_fn=run.loss_fn)
    elif replicas.dist.enabled:  # each rank scores every world-th example; the token-weighted sums are added up
        mine = [run.val_set[i] for i in range(replicas.dist.rank, len(run.val_set), replicas.world)]
        loss, count = evaluate(run.model, mine, run.collate, replicas.per_rank_batch(batch_size), run.device)
        total, count = replicas.sum([loss * count, count], "the held-out loss")
        loss, count = total / max(count, 1), int(count)
    else:
        loss, count = evaluate(run.model, run.val_set, run.collate, batch_size, run.device)
    run.result.eval_losses.append((run.state.step, loss))
    run.log.write({"step": run.state.step, "eval_loss": loss, "eval_tokens": count})
