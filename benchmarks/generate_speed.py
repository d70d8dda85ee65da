"""Batch-1 generation speed with a 4-bit base: qlorakit vs transformers + bitsandbytes (a script).

    python benchmarks/generate_speed.py [--new-tokens 32 --prompts 5 --repeats 3 --threads 1 --dtypes float32,bfloat16]

Same model, same weights: the SmolLM2-135M-Instruct GGUF is converted once by transformers to fp32
safetensors, and BOTH stacks load that directory in NF4 + double quant (block 64):

- ours: ``qlorakit.models.load_model(dir, QuantConfig(), compute_dtype=D)``, decoded by
  ``qlorakit.generate.generate_ids`` (KV cache, greedy; 4-bit linears take ``quant.gemv`` at batch 1);
- theirs: ``AutoModelForCausalLM.from_pretrained(dir, dtype=D, quantization_config=BitsAndBytesConfig(
  nf4, double quant, compute D))`` and ``model.generate(do_sample=False)``.

Same prompts: the first turn of the first ``--prompts`` MT-Bench questions, in the chat template. Every
request generates exactly ``--new-tokens`` tokens (EOS does not stop either stack: ``min_new_tokens`` for
theirs, no stop ids for ours), so both do the same work. Timed: each ``generate`` call, prefill included,
after one untimed warm-up request; end-to-end tokens/s = generated tokens / summed seconds; the time to
the first token (prefill + one token; median over prompts) and the decode rate (the other ``n - 1``
tokens / their seconds) are reported apart, from a timestamp per token (a ``streamer`` for theirs); tokens per
CPU-second (``time.process_time`` around each request) too: with ``--threads 1`` on a shared machine it is what
the wall rate would be on an idle core (shared caches and memory bandwidth still count). Each run is a fresh
interpreter (ours, theirs, theirs, ours, ...); its ``ru_maxrss`` is the peak RSS. The table gives the
median over ``--repeats`` runs and the ours/theirs ratio; the greedy tokens of the two stacks are
compared prompt by prompt (first position where they differ).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import cpu_header, git_head, median_of, run_child, vector_flags, write_result

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = REPO.parent / "shared/data/prompts/mt_bench_question.jsonl"
DEFAULT_OUTPUT = REPO / "benchmarks/results/generate_speed.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-generate-speed"
STACKS = ("qlorakit", "transformers+bnb")


# --- children ------------------------------------------------------------------------------------------


def prepare(workdir: Path) -> Path:
    """Convert the GGUF to an fp32 safetensors directory once (both stacks load it)."""
    import torch
    import transformers

    out = workdir / "smollm2-135m-instruct-fp32"
    if not (out / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dense fp32 already (see the model's README)
        del model.config.quantization_config
        tmp = workdir / "convert.tmp"
        model.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def prompt_ids(tokenizer: Any, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:count]
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["turns"][0]}], add_generation_prompt=True,
                                             tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def load_stack(stack: str, model_dir: Path, dtype: Any) -> Any:
    """A function ``(prompt ids, n) -> (new ids, perf_counter time of each new token)`` for one stack."""
    import torch

    if stack == "qlorakit":
        from qlorakit.config import QuantConfig
        from qlorakit.generate import generate_ids
        from qlorakit.models import load_model

        model = load_model(model_dir, QuantConfig(), compute_dtype=dtype)

        def ours(ids: list[int], n: int) -> tuple[list[int], list[float]]:
            tokens, times = [], []
            for token in generate_ids(model, ids, n):
                tokens.append(token)
                times.append(time.perf_counter())
            return tokens, times

        return ours
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=config,
                                                 device_map={"": "cpu"}).eval()

    class Clock:  # a generate() streamer: the first put() is the prompt, then one per new token
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def theirs(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        clock = Clock()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
        return out[0, len(ids):].tolist(), clock.times

    return theirs


def child(args: argparse.Namespace) -> None:
    import resource

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model_dir = Path(args.model_dir)
    prompts = prompt_ids(AutoTokenizer.from_pretrained(model_dir), args.prompts)
    start = time.perf_counter()
    generate = load_stack(args.stack, model_dir, dtype)
    load_s = time.perf_counter() - start
    generate(prompts[0], 4)  # warm-up
    seconds, cpu_seconds, first_token_s, decode_s, tokens = [], [], [], [], []
    for ids in prompts:
        c0, t0 = time.process_time(), time.perf_counter()
        new, times = generate(ids, args.new_tokens)
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
        first_token_s.append(times[0] - t0)  # prefill + the first token
        decode_s.append(times[-1] - times[0])  # the other n - 1 tokens
        tokens.append(new)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = sum(map(len, tokens))
    result = {"stack": args.stack, "dtype": args.dtype, "threads": args.threads, "load_s": load_s,
              "seconds": seconds, "first_token_s": first_token_s, "tokens": tokens,
              "tokens_per_s": n / sum(seconds), "cpu_tokens_per_s": n / sum(cpu_seconds),
              "decode_tokens_per_s": (n - len(tokens)) / sum(decode_s),
              "first_token_ms": 1000 * statistics.median(first_token_s), "peak_rss_mb": peak_mb}
    print(json.dumps(result))


# --- driver --------------------------------------------------------------------------------------------


def run_stack(args: argparse.Namespace, stack: str, dtype: str, threads: int, model_dir: Path) -> dict[str, Any]:
    """One run of ``stack`` at ``dtype`` on ``threads`` threads in a fresh interpreter: its measurements."""
    flags = ["--child", "--stack", stack, "--dtype", dtype, "--threads", str(threads), "--model-dir", str(model_dir),
             "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts)]
    return run_child(__file__, flags, env={"OMP_NUM_THREADS": str(threads)}, show_stderr=args.verbose)


def first_difference(a: list[int], b: list[int]) -> int | None:
    at_end = None if len(a) == len(b) else min(len(a), len(b))  # one is a prefix of the other: where it ends
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), at_end)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tps = [r["tokens_per_s"] for r in runs]
    return {"tokens_per_s": median_of(runs, "tokens_per_s"), "tokens_per_s_runs": tps,
            **{key: median_of(runs, key) for key in ("cpu_tokens_per_s", "decode_tokens_per_s", "first_token_ms",
                                                       "peak_rss_mb", "load_s")}}


def compare(args: argparse.Namespace, dtype: str, threads: int, model_dir: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STACKS}
    for repeat in range(args.repeats):
        for stack in STACKS if repeat % 2 == 0 else STACKS[::-1]:
            runs[stack].append(run_stack(args, stack, dtype, threads, model_dir))
            print(f"  {dtype} threads={threads} {stack}: {runs[stack][-1]['tokens_per_s']:.2f} tokens/s", flush=True)
    ours, theirs = summarize(runs["qlorakit"]), summarize(runs["transformers+bnb"])
    diffs = [first_difference(a, b)
             for a, b in zip(runs["qlorakit"][0]["tokens"], runs["transformers+bnb"][0]["tokens"], strict=True)]
    return {"dtype": dtype, "threads": threads, "qlorakit": ours, "transformers+bnb": theirs,
            "ratio_tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "ratio_cpu_tokens_per_s": ours["cpu_tokens_per_s"] / theirs["cpu_tokens_per_s"],
            "ratio_decode_tokens_per_s": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
            "ratio_first_token_ms": ours["first_token_ms"] / theirs["first_token_ms"],
            "ratio_peak_rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
            "greedy_first_difference_per_prompt": diffs,
            "tokens": {s: runs[s][0]["tokens"] for s in STACKS}}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'dtype':9} {'thr':>3} | {'end-to-end tok/s':>21} {'ratio':>5} | {'decode tok/s':>13} {'ratio':>5} | "
          f"{'first token ms':>15} {'ratio':>5} | {'peak RSS MB':>11} {'ratio':>5} | first greedy difference")
    print(f"{'':13} | {'ours':>10} {'bnb':>10} {'':5} | {'ours':>6} {'bnb':>6} {'':5} | "
          f"{'ours':>7} {'bnb':>7} {'':5} | {'ours':>5} {'bnb':>5}")
    for r in rows:
        o, t = r["qlorakit"], r["transformers+bnb"]
        print(f"{r['dtype']:9} {r['threads']:>3} | {o['tokens_per_s']:>10.2f} {t['tokens_per_s']:>10.2f} "
              f"{r['ratio_tokens_per_s']:>5.2f} | {o['decode_tokens_per_s']:>6.2f} {t['decode_tokens_per_s']:>6.2f} "
              f"{r['ratio_decode_tokens_per_s']:>5.2f} | {o['first_token_ms']:>7.0f} {t['first_token_ms']:>7.0f} "
              f"{r['ratio_first_token_ms']:>5.2f} | {o['peak_rss_mb']:>5.0f} {t['peak_rss_mb']:>5.0f} "
              f"{r['ratio_peak_rss']:>5.2f} | {r['greedy_first_difference_per_prompt']}")
    print("tokens per CPU-second (process time; with 1 thread it is what wall time would be on an idle core):")
    for r in rows:
        o, t = r["qlorakit"], r["transformers+bnb"]
        print(f"  {r['dtype']:9} {r['threads']:>3} | ours {o['cpu_tokens_per_s']:.2f} bnb {t['cpu_tokens_per_s']:.2f} "
              f"ratio {r['ratio_cpu_tokens_per_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--verbose", action="store_true", help="show the children's stderr")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = int(args.threads)
        child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare(args.workdir)
    flags = vector_flags()
    print(cpu_header(flags))
    rows = [compare(args, dtype, int(threads), model_dir)
            for threads in args.threads.split(",") for dtype in args.dtypes.split(",")]
    print_table(rows)
    from importlib.metadata import version

    write_result(args.output, {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_head": git_head(),
        "cpu_flags": flags, "cpu_count": os.cpu_count(), "new_tokens": args.new_tokens, "prompts": args.prompts,
        "repeats": args.repeats, "versions": {p: version(p) for p in ("torch", "transformers", "bitsandbytes")},
        "results": rows,
    })


if __name__ == "__main__":
    main()
