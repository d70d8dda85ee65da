"""Aggregate throughput of ``qlorakit serve`` at concurrency 1, 4, 16 over mixed adapters, against decoding
one request at a time through qlorakit and through transformers + peft (a script).

    python benchmarks/serve_throughput.py [--requests 16 --new-tokens 48 --concurrency 1,4,16 --threads 1]

Same base and adapters for every side: the SmolLM2-135M-Instruct GGUF converted once to fp32 safetensors
(``generate_speed.prepare``) and loaded in NF4 + double quant; three random LoRA adapters (r 8 on all seven
projections, B ~ N(0, 0.02^2): nonzero, small enough to keep the text readable) saved in PEFT's layout.
The requests: the first turns of the first ``--requests`` MT-Bench questions in the chat template, adapters
assigned round-robin over (base, a1, a2, a3), greedy, at most ``--new-tokens`` new tokens (EOS may stop one
earlier: the tokens counted are the ones each side generated).

- sequential qlorakit: ``use_adapter`` + ``generate_text`` per request, one after another;
- server c = 1, 4, 16: ``qlorakit.serve`` on 127.0.0.1 in this process, ``c`` client threads with the
  official ``openai`` client taking requests from one list (continuous batching across adapters);
- transformers + peft: ``AutoModelForCausalLM`` with bitsandbytes NF4, ``PeftModel`` holding the three
  adapters, ``set_adapter`` (or ``disable_adapter`` for the base) and ``generate(do_sample=False)`` per request.

Aggregate tokens/s = generated tokens / wall seconds of the whole phase; latency = submission to the last
token of a request (p50, p95). The server's answers are compared with the sequential ones (greedy: they
should be equal). One process, one run per phase (``--repeats`` repeats each phase and takes medians);
the RSS after each phase and the peak are reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from generate_speed import PROMPTS, prepare

from _harness import cpu_header, git_head, vector_flags, write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks/results/serve_throughput.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-serve-throughput"
ADAPTERS = ("a1", "a2", "a3")


def make_adapters(model_dir: Path, workdir: Path) -> dict[str, Path]:
    """Three random PEFT adapters of the base (saved once)."""
    import torch

    from qlorakit.config import LoraConfig, QuantConfig
    from qlorakit.lora import lora_layers, save_adapter
    from qlorakit.models import load_model

    dirs = {name: workdir / f"adapter-{name}" for name in ADAPTERS}
    if all((d / "adapter_config.json").is_file() for d in dirs.values()):
        return dirs
    model = load_model(model_dir, QuantConfig(), lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    for seed, directory in enumerate(dirs.values()):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        save_adapter(model, directory, overwrite=True)
    return dirs


def requests(tokenizer: Any, count: int) -> list[tuple[str | None, str]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:count]
    models = (None, *ADAPTERS)
    return [(models[i % len(models)], row["turns"][0]) for i, row in enumerate(rows)]


def summary(tokens: int, seconds: float, latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
            "p50_latency_s": round(statistics.median(ordered), 3), "p95_latency_s": round(p95, 3)}


def sequential_qlorakit(model: Any, tokenizer: Any, work: list, new_tokens: int) -> tuple[dict, list[str]]:
    from qlorakit.generate import chat_prompt_ids, generate_text, use_adapter

    texts, latencies, tokens = [], [], 0
    start = time.perf_counter()
    for adapter, prompt in work:
        began = time.perf_counter()
        use_adapter(model, adapter)
        result = generate_text(model, tokenizer, chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]),
                               new_tokens)
        latencies.append(time.perf_counter() - began)
        tokens += len(result.token_ids)
        texts.append(result.text)
    return summary(tokens, time.perf_counter() - start, latencies), texts


def served(url: str, work: list, new_tokens: int, concurrency: int) -> tuple[dict, list[str]]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(index: int) -> tuple[int, str, int, float]:
        adapter, prompt = work[index]
        began = time.perf_counter()
        reply = client.chat.completions.create(model=adapter or "base", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=new_tokens, temperature=0)
        return index, reply.choices[0].message.content, reply.usage.completion_tokens, time.perf_counter() - began

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = sorted(pool.map(one, range(len(work))))
    seconds = time.perf_counter() - start
    return summary(sum(r[2] for r in results), seconds, [r[3] for r in results]), [r[1] for r in results]


def peft_side(model_dir: Path, adapters: dict[str, Path], tokenizer: Any, work: list, new_tokens: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config,
                                                device_map={"": "cpu"}).eval()
    first, *rest = ADAPTERS
    model = PeftModel.from_pretrained(base, adapters[first], adapter_name=first).eval()
    for name in rest:
        model.load_adapter(adapters[name], adapter_name=name)
    latencies, tokens = [], 0
    for index, (adapter, prompt) in enumerate([work[0], *work]):  # the first: an untimed warm-up
        if index == 1:
            start = time.perf_counter()
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        began = time.perf_counter()
        with torch.inference_mode():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
            else:
                model.set_adapter(adapter)
                out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
        if index > 0:
            latencies.append(time.perf_counter() - began)
            tokens += out.shape[1] - ids.shape[1]
    return summary(tokens, time.perf_counter() - start, latencies)


def rss_mb() -> dict[str, float]:
    from qlorakit.hardware import current_rss_mb

    return {"rss_mb": round(current_rss_mb(), 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF)
                                                                        .ru_maxrss / 1024, 1)}


def run(args: argparse.Namespace) -> dict:
    import torch

    from qlorakit.config import QuantConfig
    from qlorakit.generate import AdapterSpec
    from qlorakit.lora import load_adapter
    from qlorakit.models import load_model, load_tokenizer
    from qlorakit.serve.config import ServeConfig
    from qlorakit.serve.runner import BackgroundServer, build_engine

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare(workdir)
    adapters = make_adapters(model_dir, workdir)
    tokenizer = load_tokenizer(model_dir)
    work = requests(tokenizer, args.requests)
    phases: dict[str, Any] = {}

    model = load_model(model_dir, QuantConfig(), compute_dtype=torch.float32).eval()
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    model.eval()
    sequential_qlorakit(model, tokenizer, work[:1], 2)  # warm-up: kernels built, caches warm
    runs = [sequential_qlorakit(model, tokenizer, work, args.new_tokens) for _ in range(args.repeats)]
    sequential_texts = runs[0][1]
    phases["sequential_qlorakit"] = {**_median([r[0] for r in runs]), **rss_mb()}
    print("sequential qlorakit", phases["sequential_qlorakit"], flush=True)
    del model

    config = ServeConfig(host="127.0.0.1", port=0, max_batch=16, max_queue=256)
    engine_model = load_model(model_dir, QuantConfig(), compute_dtype=torch.float32).eval()
    engine = build_engine(engine_model, tokenizer, "base", [str(model_dir)], config,
                          [AdapterSpec(n, p) for n, p in adapters.items()])
    server = BackgroundServer(engine, config)
    try:
        served(server.url, work[:2], 2, 2)  # warm-up
        for concurrency in args.concurrency:
            runs = [served(server.url, work, args.new_tokens, concurrency) for _ in range(args.repeats)]
            equal = sum(a == b for a, b in zip(runs[0][1], sequential_texts, strict=True))
            phases[f"server_c{concurrency}"] = {**_median([r[0] for r in runs]), "answers_equal_sequential": equal,
                                                **rss_mb()}
            print(f"server c={concurrency}", phases[f"server_c{concurrency}"], flush=True)
    finally:
        server.close()
    del engine, engine_model

    if not args.skip_peft:
        runs = [peft_side(model_dir, adapters, tokenizer, work, args.new_tokens) for _ in range(args.repeats)]
        phases["transformers_peft_sequential"] = {**_median(runs), **rss_mb()}
        print("transformers + peft", phases["transformers_peft_sequential"], flush=True)
    return phases


def _median(runs: list[dict]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def table(phases: dict[str, Any]) -> str:
    base = phases["sequential_qlorakit"]["tokens_per_s"]
    peft = phases.get("transformers_peft_sequential", {}).get("tokens_per_s")
    lines = [f"{'side':<30} {'tokens':>6} {'tok/s':>8} {'x seq':>6} {'x peft':>7} {'p50 s':>7} {'p95 s':>7} "
             f"{'equal':>5} {'rss MiB':>8}"]
    for name, p in phases.items():
        vs_peft = f"{p['tokens_per_s'] / peft:.2f}" if peft else "-"
        lines.append(f"{name:<30} {p['tokens']:>6} {p['tokens_per_s']:>8.2f} {p['tokens_per_s'] / base:>6.2f} "
                     f"{vs_peft:>7} {p['p50_latency_s']:>7.2f} {p['p95_latency_s']:>7.2f} "
                     f"{p.get('answers_equal_sequential', '-'):>5} {p['rss_mb']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    flags = vector_flags()
    print(cpu_header(flags), flush=True)
    phases = run(args)
    print(table(phases))
    base = phases["sequential_qlorakit"]["tokens_per_s"]
    top = f"server_c{max(args.concurrency)}"
    write_result(args.output, {
        "benchmark": "serve_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_head": git_head(), "cpu_flags": flags, "threads": args.threads, "requests": args.requests,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "phases": phases,
        "speedup_top_concurrency_vs_sequential": round(phases[top]["tokens_per_s"] / base, 2),
    })


if __name__ == "__main__":
    main()
