"""The step of a preference run: DPO or ORPO losses (``train.preference``) over micro-batches of pairs.

``PreferenceObjective`` is what ``train.loop`` calls instead of the SFT cross-entropy when
``objective.method`` is ``dpo`` or ``orpo``; the loop keeps the schedule, clipping, guard, logging, eval and
checkpoints. DPO's reference log-probs (the base with the adapters off, no grad) come from one of two places:

- ``cached``: ``prepare`` scores every train and held-out pair once before the first step (eval mode,
  ``eval_batch`` pairs at a time) and the steps look them up by the pair's index. A resumed run scores them
  again: the base is frozen, so the values are the same.
- ``same-step``: every step runs one more no-grad forward over its micro-batch with the adapters off.

docs/preference.md has the measured speeds of both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch

from qlorakit.config import ObjectiveConfig
from qlorakit.lora import disable_adapters
from qlorakit.train.preference import dpo_loss, odds_ratio_loss, sequence_logps

Batch = dict[str, torch.Tensor]


class PreferenceObjective:
    """DPO / ORPO for ``train.loop``: ``prepare``, ``forward_backward`` (one step), ``evaluate``."""

    def __init__(self, cfg: ObjectiveConfig, chunk_tokens: int, eval_batch: int = 8) -> None:
        if cfg.method not in ("dpo", "orpo"):
            raise ValueError(f"PreferenceObjective is for dpo / orpo, not {cfg.method!r}")
        self.cfg, self.chunk_tokens, self.eval_batch = cfg, chunk_tokens, eval_batch
        self.cache: dict[int, torch.Tensor] = {}  # id(dataset) -> (n_pairs, 2) reference logps (chosen, rejected)
        self.last_metrics: dict[str, float] = {}
        self.note = ""  # how an automatic choice was made (the reference mode), for the plan
        # (model, batch, chunk_tokens) -> per-row (log-prob sums, counts); the trainer swaps in the FSDP root's
        # forward around it for a sharded model (train.sharded.fsdp_logps)
        self.logps: Callable = sequence_logps

    @property
    def cached(self) -> bool:
        return self.cfg.method == "dpo" and self.cfg.dpo_reference == "cached"

    def prepare(self, model, datasets: Sequence[Sequence[dict]], collate: Callable, device) -> dict[str, float]:
        """Score the reference log-probs of every pair of ``datasets`` once (``cached`` DPO only); returns what
        it did (``reference_pairs``, ``reference_cache_s``) for the metrics log, or {} when nothing was cached."""
        if not self.cached:
            return {}
        started, pairs = time.perf_counter(), 0
        for dataset in datasets:
            if not len(dataset) or id(dataset) in self.cache:
                continue
            table = torch.zeros(len(dataset), 2, dtype=torch.float32)  # (n_pairs, 2)
            for batch in _batches(dataset, collate, self.eval_batch, device):
                table[batch["pair_index"].cpu()] = self._reference(model, batch, eval_mode=True).cpu()
            self.cache[id(dataset)] = table
            pairs += len(dataset)
        return {"reference_pairs": pairs, "reference_cache_s": round(time.perf_counter() - started, 4)}

    def _reference(self, model, batch: Batch, eval_mode: bool = False) -> torch.Tensor:
        """(B, 2) reference log-probs of a batch's pairs: the base alone, no grad."""
        was_training = model.training
        if eval_mode:
            model.eval()
        with torch.no_grad(), disable_adapters(model):
            logps, _ = self.logps(model, batch, self.chunk_tokens)  # (2B,)
        model.train(was_training)
        return torch.stack(logps.chunk(2), dim=1)  # (B, 2)

    def _reference_for(self, model, batch: Batch, dataset) -> torch.Tensor:
        table = self.cache.get(id(dataset)) if dataset is not None else None
        if table is None:
            return self._reference(model, batch)
        return table[batch["pair_index"].cpu()].to(batch["input_ids"].device)  # (B, 2)

    def _pair_terms(self, model, batch: Batch, dataset) -> dict[str, torch.Tensor]:
        """Per-pair losses (with grad) and metric terms of one micro-batch."""
        logps, counts = self.logps(model, batch, self.chunk_tokens)  # (2B,), (2B,)
        chosen, rejected = logps.chunk(2)  # (B,) each
        n_chosen, n_rejected = counts.chunk(2)
        terms = {"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        if self.cfg.method == "dpo":
            ref = self._reference_for(model, batch, dataset)  # (B, 2)
            losses, r_w, r_l = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.cfg.dpo_beta)
            terms["pair_loss"] = losses
        else:
            avg_w, avg_l = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)  # (B,)
            losses, log_odds, r_w, r_l = odds_ratio_loss(avg_w, avg_l, self.cfg.orpo_beta)
            terms.update(pair_loss=losses, chosen_nll_sum=-chosen.sum(),
                         log_odds_ratio=torch.nn.functional.logsigmoid(log_odds).detach(),
                         log_odds_chosen=log_odds.detach())
        terms.update({"rewards/chosen": r_w, "rewards/rejected": r_l, "rewards/margins": r_w - r_l,
                      "rewards/accuracies": (r_w > r_l).float()})
        return terms

    def forward_backward(self, model, batches: Sequence[Batch], dataset=None,
                         reduce: Callable[[list[float], str], list[float]] | None = None,
                         sync: Callable[[bool], None] | None = None) -> tuple[float, int]:
        """Backward of the step's loss (mean over all its pairs; see ``train.preference``); (loss, input tokens).

        Under several ranks ``reduce`` (``Replicas.sum``) adds up the pair and chosen-token counts first, so
        each rank backpropagates its pairs' share of the mean over the global step; the returned loss and the
        metrics are then this rank's parts, and the metrics are summed here (the caller sums loss and tokens).
        FSDP: ``sync(last)`` before each micro-batch (``FsdpRun.sync_gradients``), and a batch marked
        ``empty_share`` (a rank's empty share, one stand-in pair) runs its forward and backward with weight 0.
        """
        real = [b for b in batches if "empty_share" not in b]
        n_pairs = sum(b["pair_index"].shape[0] for b in real)
        n_chosen = sum(_chosen_tokens(b) for b in real)
        if reduce is not None:
            n_pairs, n_chosen = (int(x) for x in reduce([n_pairs, n_chosen], "the step's pair and token counts"))
        n_pairs, n_chosen = max(n_pairs, 1), max(n_chosen, 1)
        sums: dict[str, float] = {}
        total, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            if sync is not None:
                sync(i == len(batches) - 1)
            empty = batch.pop("empty_share", False)
            terms = self._pair_terms(model, batch, dataset)
            loss = terms["pair_loss"].sum() / n_pairs
            if empty:  # FSDP's collectives only (every rank runs every micro-batch): no gradient, no metrics
                (loss * 0.0).backward()
                continue
            if "chosen_nll_sum" in terms:
                nll = terms.pop("chosen_nll_sum") / n_chosen
                sums["nll_loss"] = sums.get("nll_loss", 0.0) + float(nll.detach())
                loss = loss + nll
            loss.backward()
            total += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
            _accumulate(sums, terms, n_pairs)
        if reduce is not None:  # every rank the same names (a rank may have had no pairs in this step)
            names = self.metric_names()
            sums = dict(zip(names, reduce([sums.get(n, 0.0) for n in names], "the step's metrics"), strict=True))
        self.last_metrics = sums
        return total, tokens

    def metric_names(self) -> tuple[str, ...]:
        """The per-step metrics ``forward_backward`` logs for this method (TRL's names)."""
        names = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies")
        return names + (("log_odds_ratio", "log_odds_chosen", "nll_loss") if self.cfg.method == "orpo" else ())

    def evaluate(self, model, dataset: Sequence[dict], collate: Callable, device) -> dict[str, float]:
        """``eval_``-prefixed loss and metrics over every pair of ``dataset`` (eval mode, no grad)."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        n_chosen = max(sum(_chosen_tokens(b) for b in _batches(dataset, collate, self.eval_batch, "cpu")), 1)
        with torch.no_grad():
            for batch in _batches(dataset, collate, self.eval_batch, device):
                terms = self._pair_terms(model, batch, dataset)
                loss = terms.pop("pair_loss").sum() / len(dataset)
                if "chosen_nll_sum" in terms:
                    nll = terms.pop("chosen_nll_sum") / n_chosen
                    sums["nll_loss"] = sums.get("nll_loss", 0.0) + float(nll)
                    loss = loss + nll
                sums["loss"] = sums.get("loss", 0.0) + float(loss)
                _accumulate(sums, terms, len(dataset))
        model.train(was_training)
        return {f"eval_{name}": value for name, value in sums.items()} | {"eval_pairs": len(dataset)}


def _chosen_tokens(batch: Batch) -> int:
    half = batch["labels"].shape[0] // 2
    return int((batch["labels"][:half, 1:] != -100).sum())


def _accumulate(sums: dict[str, float], terms: dict[str, torch.Tensor], n_pairs: int) -> None:
    for name, value in terms.items():
        if name != "pair_loss":
            sums[name] = sums.get(name, 0.0) + float(value.detach().sum()) / n_pairs


def _batches(dataset: Sequence[dict], collate: Callable, size: int, device):
    for start in range(0, len(dataset), size):
        batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        yield {k: v.to(device) for k, v in batch.items()}


def preference_run_inputs(cfg, tokenizer) -> tuple[Sequence[dict], Sequence[dict], object, Callable,
                                                     PreferenceObjective]:
    """(train pairs, held-out pairs, their summary, the pair collate, the objective) for a dpo / orpo run."""
    from qlorakit.data.pairs import build_pair_datasets, pair_collate_fn

    train_set, val_set, summary = build_pair_datasets(cfg.data, tokenizer)
    objective_cfg, note = cfg.objective, ""
    if cfg.objective.method == "dpo" and cfg.objective.dpo_reference == "auto":
        reference, note = choose_reference(cfg, len(train_set), len(val_set))
        objective_cfg = dataclasses.replace(cfg.objective, dpo_reference=reference)
    objective = PreferenceObjective(objective_cfg, cfg.memory.loss_chunk_tokens, eval_batch=cfg.train.batch_size)
    objective.note = note
    return train_set, val_set, summary, pair_collate_fn(tokenizer), objective


def choose_reference(cfg, n_train: int, n_val: int) -> tuple[str, str]:
    """``dpo_reference: auto``: the mode with fewer reference forwards, and why.

    cached scores every train and held-out pair once; same-step scores each pair the steps visit, and the held-out
    pairs at every evaluation. One pair costs about the same in both (docs/preference.md, benchmarks/dpo_reference.py).
    """
    t = cfg.train
    per_step = t.batch_size * t.grad_accum
    steps = t.max_steps or math.ceil(t.epochs * math.ceil(n_train / t.batch_size) / t.grad_accum)
    every = cfg.eval.eval_steps
    evals = (1 + (steps // every + (steps % every != 0) if every else 1)) if n_val else 0  # step 0, ..., the end
    cached, same_step = n_train + n_val, steps * per_step + evals * n_val
    choice = "cached" if cached <= same_step else "same-step"
    return choice, (f"reference  {choice} (auto): cached scores {cached:,} pairs once, same-step {same_step:,} "
                    f"({steps} steps x {per_step} pairs + {evals} evaluations x {n_val} held-out pairs)")
