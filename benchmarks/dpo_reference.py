"""DPO's reference log-probs: scored once before training (``cached``) or in every step (``same-step``).

Both modes train the same run (the losses agree to fp32 rounding, tests/train/test_preference_run.py); they
differ in when the no-grad base forward with the adapters off happens: ``cached`` scores every train and
held-out pair once before step 1, ``same-step`` scores each micro-batch again at every visit. The run here is
``--epochs E`` over Vicuna preference pairs (``qlorakit data vicuna-pairs --per-question 1``: 80 pairs,
answers cut to 32 tokens), each mode in a fresh interpreter, alternating, median of ``--repeats``. Timed:
the reference cache (``reference_cache_s`` in metrics.jsonl), the steps (``elapsed_s`` of the last step), and
the whole ``train()`` call (cache, the two evaluations, steps, saves). The whole call is the fair number: the
first forward of a process pays a warm-up, which falls into the cache in ``cached`` mode and into the (else
untimed) step-0 evaluation in ``same-step`` mode, and same-step evaluations score the reference too.

    python benchmarks/dpo_reference.py [--model DIR] [--epochs 1 2] [--repeats 3] [--out FILE]

``--model`` default: a random tiny Llama (tests/helpers) with the SmolLM2 tokenizer, written to a temporary
folder. Writes benchmarks/results/dpo_reference.json; it never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _harness

RESULT = _harness.REPO / "benchmarks" / "results" / "dpo_reference.json"
SMOL = _harness.REPO.parent / "shared" / "models" / "smollm2-135m-instruct"
ELO = _harness.REPO.parent / "shared" / "data" / "elo"
MODES = ("cached", "same-step")


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(_harness.REPO / "src"))
    import time

    import qlorakit.train
    from qlorakit.cli.main import main
    from qlorakit.train import read_metrics

    timed = {}
    inner = qlorakit.train.train

    def train_timed(*a, **k):  # the whole train() call: cache, evaluations (with their warm-up), steps, saves
        started = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            timed["train_call_s"] = time.perf_counter() - started

    qlorakit.train.train = train_timed  # train_cmd imports it from the package when it runs

    out = Path(args.work) / f"run-{args.mode}"
    argv = ["train", "--model", args.model, "--data", args.data, "--output-dir", str(out), "--overwrite",
            "--method", "dpo", "--dpo-reference", args.mode, "--epochs", str(args.epochs), "--batch-size", "4",
            "--grad-accum", "1", "--val-size", "0.2", "--source-max-len", "64", "--target-max-len", "32",
            "--lora-r", "16", "--no-gradient-checkpointing", "--no-progress", "--warmup-ratio", "0"]
    if main(argv) != 0:
        raise SystemExit("training failed")
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    cache = sum(r.get("reference_cache_s", 0.0) for r in rows)
    print(json.dumps({"mode": args.mode, "epochs": args.epochs, "steps": len(steps), "steps_s": steps[-1]["elapsed_s"],
                      "cache_s": cache, "total_s": steps[-1]["elapsed_s"] + cache, "tokens": steps[-1]["tokens"],
                      "train_call_s": timed["train_call_s"],
                      "last_loss": steps[-1]["loss"]}))


def driver(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="dpo-reference-") as work:
        sys.path.insert(0, str(_harness.REPO / "src"))
        sys.path.insert(0, str(_harness.REPO))
        from qlorakit.data.vicuna_pairs import build_vicuna_pairs

        rows, _ = build_vicuna_pairs(ELO, per_question=1, seed=0)
        data = Path(work) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        model = args.model or str(_tiny_model(Path(work) / "tiny"))
        results: dict[str, dict[str, list]] = {}
        for epochs in args.epochs:
            runs: dict[str, list] = {m: [] for m in MODES}
            for repeat in range(args.repeats):
                for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                    runs[mode].append(_harness.run_child(__file__, ["--child", "--mode", mode, "--model", model,
                                                                    "--data", str(data), "--work", work,
                                                                    "--epochs", str(epochs)]))
            results[str(epochs)] = runs
    table = {e: _harness.medians(r, ("cache_s", "steps_s", "total_s", "train_call_s")) for e, r in results.items()}
    print(_harness.cpu_header(_harness.vector_flags()))
    print(f"{'epochs':>6} {'mode':>10} {'cache s':>8} {'steps s':>8} {'c+s s':>8} {'train() s':>9}  "
          f"(medians of {args.repeats})")
    for e, by_mode in table.items():
        for mode, m in by_mode.items():
            print(f"{e:>6} {mode:>10} {m['cache_s']:8.2f} {m['steps_s']:8.2f} {m['total_s']:8.2f} "
                  f"{m['train_call_s']:9.2f}")
        ratio = by_mode["same-step"]["train_call_s"] / by_mode["cached"]["train_call_s"]
        print(f"{'':>6} {'ratio':>10} same-step / cached, whole train() = {ratio:.2f}")
    _harness.write_result(args.out, {"commit": _harness.git_head(), "cpu": _harness.cpu_model(),
                                   "flags": _harness.vector_flags(), "repeats": args.repeats,
                                   "model": args.model or "tiny llama (tests/helpers)", "medians": table,
                                   "runs": results})


def _tiny_model(directory: Path) -> Path:
    from transformers import AutoTokenizer

    from tests.helpers.tiny_llama import save_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(SMOL), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return save_tiny_llama(directory, tok, vocab_size=len(tok), tie_word_embeddings=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model directory or alias (default: a tiny random Llama)")
    p.add_argument("--epochs", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULT), help="result JSON (default: benchmarks/results/dpo_reference.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.epochs = args.epochs[0]
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
