"""Whether a run trains on packed rows (``data.packing``), decided by a check of the model, and the packed set.

``data.packing`` (on by default) asks for packing; the run packs only when ``packing_problem(model)`` finds
none. The check runs the model (eval mode, no grad, a few tokens) on three inputs:

    packed  = model([a ; b],  positions [0..4, 0..3])[b's rows]
    other   = model([a'; b],  positions [0..4, 0..3])[b's rows]      (a' != a: other tokens in front of b)
    alone   = model(b)

and requires ``packed == other`` (no attention from ``b`` into the example before it) and ``packed == alone``
(positions restart: ``b`` is computed as when run by itself), each to ``PROBE_RTOL`` of ``|alone|`` for the
compute dtype. transformers 5 passes this for Llama-style models with sdpa, eager and flash attention: with
``position_ids`` and no 2-D mask (and no cache) its ``create_causal_mask`` finds the sequences where the
positions restart and builds a block-diagonal causal mask (sdpa / eager) or variable-length offsets (flash).
A model that fails the check or cannot take ``position_ids`` trains unpacked, and the run says why.

The decision, with the packing statistics and the padding share of the first epoch's micro-batches with and
without packing, is printed and written to ``<run>/packing.json`` (``PACKING_FILE``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from qlorakit.config import RunConfig
from qlorakit.data.batching import batch_order
from qlorakit.data.packing import PackedDataset, collate_packed, padding_fraction
from qlorakit.fileio import write_json_atomic

PACKING_FILE = "packing.json"
#: Largest ``max|difference| / max|alone|`` the check accepts: fp32 rounding of a changed layout, or one
#: 16-bit rounding step; leaked attention moves logits by a large fraction of their size.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
PROBE_RTOL_16BIT = 2e-2
PROBE_LENGTHS = (5, 4)


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot train on packed rows (see the module docstring), or None when it can."""
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    g = torch.Generator().manual_seed(0)
    n_a, n_b = PROBE_LENGTHS
    a, a2, b = (torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (n_a, n_a, n_b))
    positions = torch.cat([torch.arange(n_a), torch.arange(n_b)]).unsqueeze(0).to(device)  # (1, n_a + n_b)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits[:, n_a:]
            other = model(input_ids=torch.cat([a2, b], 1), position_ids=positions, use_cache=False).logits[:, n_a:]
            alone = model(input_ids=b, use_cache=False).logits  # (1, n_b, V)
    except (TypeError, ValueError, RuntimeError) as error:
        return f"the model's forward does not take packed position_ids ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    rtol = PROBE_RTOL.get(alone.dtype, PROBE_RTOL_16BIT)
    scale = float(alone.float().abs().max()) or 1.0
    leak = float((packed.float() - other.float()).abs().max()) / scale
    shift = float((packed.float() - alone.float()).abs().max()) / scale
    if leak > rtol:
        return f"its attention crosses packed examples (an example's logits move by {leak:.2e} of their size)"
    if shift > rtol:
        return f"a packed example differs from the same example alone ({shift:.2e} of the logits' size)"
    return None


def pack_for_training(
    model: torch.nn.Module, train_set: Sequence[dict], collate: Callable, cfg: RunConfig, run_dir: Path,
    report: bool = True,
) -> tuple[Sequence[dict], Callable | None]:
    """The training items and their collate: packed rows when asked and the check passes, else ``(train_set,
    None)`` (the unpacked collate stays). ``report`` (rank 0 of several): print the decision and write
    ``<run>/packing.json``."""
    record: dict = {"requested": cfg.data.packing, "enabled": False, "row_len": cfg.data.seq_limit}
    problem = packing_problem(model) if cfg.data.packing else "off (--no-packing)"
    items: Sequence[dict] = train_set
    train_collate = None
    if problem is None:
        items = PackedDataset(train_set, cfg.data.seq_limit)
        train_collate = partial(collate_packed, collate=collate)
        stats = items.stats
        before = _first_epoch_padding([len(x["input_ids"]) for x in train_set], cfg)
        after = _first_epoch_padding(items.lengths, cfg)
        record.update(enabled=True, examples=stats.examples, rows=stats.rows, cut_examples=stats.cut_examples,
                      padding_unpacked=round(before, 4), padding_packed=round(after, 4))
        line = (f"packing    on: {stats.examples:,} examples in {stats.rows:,} rows of {stats.row_len} tokens "
                f"({stats.cut_examples} cut at a row end); padding of the first epoch {before:.1%} -> {after:.1%}; "
                f"batch_size {cfg.train.batch_size} counts rows")
    else:
        record["reason"] = problem
        line = f"packing    {problem if not cfg.data.packing else 'off: ' + problem + '; training unpacked'}"
    if report:
        print(line)
        write_json_atomic(Path(run_dir) / PACKING_FILE, record)
    return items, train_collate


def _first_epoch_padding(lengths: Sequence[int], cfg: RunConfig) -> float:
    batches = batch_order(lengths, cfg.train.batch_size, cfg.data.seed, 0, cfg.data.group_by_length)
    return padding_fraction(lengths, batches)
