"""Peak memory and time of loading a model in 4 bits: qlorakit vs transformers + bitsandbytes (a script).

    python benchmarks/load_memory.py [--repeats 3] [--big-repeats 1] [--workdir DIR] [--skip-big] [--output JSON]

Both sides load the same bf16 safetensors checkpoint into NF4 with double quantization (block 64) on
the CPU, compute dtype bf16, embeddings / head in bf16:

- ours: ``qlorakit.models.load_model(dir, QuantConfig(), compute_dtype=torch.bfloat16)`` — model built on
  the meta device, tensors streamed one by one and quantized as they arrive;
- theirs: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16, device_map={"": "cpu"})``.

Models: (a) SmolLM2-135M-Instruct, its shared Q4_1 GGUF converted once by transformers to a bf16
safetensors directory; (b) a random-weight Llama of 1.1B parameters (TinyLlama's shape: hidden 2048,
22 layers, MLP 5632, vocab 32000, untied head), written by this script as bf16 safetensors in 500 MB
shards. Both are cached in ``--workdir`` (default: a directory under the system temp dir).

Every load runs in a fresh subprocess that imports torch, transformers and the loader first and then
records its resident set (the baseline); after the load it records ``ru_maxrss`` (peak RSS of the
process, file-backed pages of memory-mapped checkpoints included) and the load's wall time. Reported:
peak, baseline, peak - baseline, the anonymous and file-backed parts of the resident set right after
the load (a memory-mapped checkpoint still mapped shows as "file"), time (medians over the repeats) and
ours/theirs ratios; the target is ours <= 0.6 x their peak RSS. ``TORCH_COMPILE_DISABLE=1`` in both children
(bitsandbytes wraps CPU fallbacks in torch.compile). Writes ``benchmarks/results/load_memory.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import medians, run_child, write_result

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = REPO / "benchmarks/results/load_memory.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qlorakit-load-memory"
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip
TARGET_RATIO = 0.6
SHARD_BYTES = 500 * 2**20


# --- the child: one load, measured ------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` field in MiB: ``VmHWM`` (peak resident set of this address space, a
    cross-check of ``ru_maxrss``), ``RssAnon`` (heap, tensors) or ``RssFile`` (mapped files, e.g. a
    memory-mapped checkpoint: counted in the peak but reclaimable by the kernel)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _state_mib(model: Any) -> float:
    """Bytes of the loaded model's state dict (bitsandbytes layout on both sides), shared storage once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total / 2**20


def worker(kind: str, model_dir: str) -> dict[str, Any]:
    """Load ``model_dir`` with ``kind`` ("ours" or "theirs") and return the measurements."""
    import torch
    import transformers

    if kind == "ours":
        from qlorakit.config import QuantConfig
        from qlorakit.models import load_model
    else:
        import bitsandbytes  # noqa: F401 — imported before the baseline, like qlorakit on the other side
    baseline_rss, baseline_peak = _rss_mib(), _peak_mib()
    start = time.perf_counter()
    if kind == "ours":
        model = load_model(model_dir, QuantConfig(), compute_dtype=torch.bfloat16)
    else:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=config, dtype=torch.bfloat16, device_map={"": "cpu"}
        )
    seconds = time.perf_counter() - start
    peak, after = _peak_mib(), _rss_mib()
    quantized = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    return {
        "kind": kind, "seconds": seconds, "peak_rss_mib": peak, "vm_hwm_mib": _status_mib("VmHWM"),
        "rss_anon_after_mib": _status_mib("RssAnon"), "rss_file_after_mib": _status_mib("RssFile"),
        "baseline_rss_mib": baseline_rss, "baseline_peak_mib": baseline_peak, "rss_after_mib": after,
        "peak_minus_baseline_mib": peak - baseline_rss, "model_state_mib": _state_mib(model),
        "linear4bit_modules": quantized, "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }  # fmt: skip


def _child(*args: str) -> Any:
    """Run this script with ``args`` in a fresh interpreter; its last stdout line is JSON.

    The driver itself never imports torch: Linux carries a process's peak RSS across fork + exec into
    the child's ``ru_maxrss``, so a large parent would inflate every child's peak.
    """
    return run_child(__file__, args, env={"TORCH_COMPILE_DISABLE": "1", "TQDM_DISABLE": "1"})


def measure(kind: str, model_dir: Path) -> dict[str, Any]:
    """One load of ``kind`` in a fresh interpreter, measured there."""
    return _child("--worker", kind, "--model", str(model_dir))


# --- preparing the checkpoints (once, cached) ----------------------------------------------------------


def prepare_smollm2(workdir: Path) -> Path:
    """The shared SmolLM2 GGUF, dequantized by transformers and saved as bf16 safetensors."""
    out = workdir / "smollm2-135m-bf16"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # the weights are dense already; see the model's README
    del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(_partial(out))
    os.replace(_partial(out), out)
    return out


def prepare_llama_1b(workdir: Path) -> Path:
    """A random bf16 Llama of ~1.1B parameters, written tensor by tensor into 500 MB shards."""
    out = workdir / "llama-1.1b-random-bf16"
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    import transformers

    from qlorakit.models.meta import init_empty_weights

    config = transformers.LlamaConfig(**LLAMA_1B)
    with init_empty_weights():
        shapes = {n: tuple(p.shape) for n, p in transformers.LlamaForCausalLM(config).named_parameters()}
    tmp = _partial(out)
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[list[str]] = []
    current: dict[str, Any] = {}
    for name, shape in shapes.items():
        if sum(t.numel() * t.element_size() for t in current.values()) >= SHARD_BYTES:
            shards.append(_write_shard(tmp, len(shards), current))
        value = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=generator) * 0.02
        current[name] = value.to(torch.bfloat16)
    shards.append(_write_shard(tmp, len(shards), current))
    _write_index(tmp, shards)
    config.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _write_shard(directory: Path, number: int, tensors: dict[str, Any]) -> list[str]:
    """Save ``tensors`` as shard ``number`` (renamed by ``_write_index``), empty the dict, return the names."""
    from safetensors.torch import save_file

    save_file(tensors, directory / f"shard-{number}.safetensors", metadata={"format": "pt"})
    names = list(tensors)
    tensors.clear()
    return names


def _write_index(directory: Path, shards: list[list[str]]) -> None:
    """Rename the shards to transformers' ``model-0000i-of-0000n`` and write the index."""
    weight_map = {}
    for number, names in enumerate(shards):
        filename = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / f"shard-{number}.safetensors", directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# --- the driver: repeats, table, JSON ----------------------------------------------------------------


def bench_model(name: str, model_dir: Path, repeats: int) -> dict[str, Any]:
    """``repeats`` alternating loads of each side; medians and the ours/theirs ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    for _ in range(repeats):
        for kind in ("theirs", "ours"):
            runs[kind].append(measure(kind, model_dir))
            print(
                f"  {name} {kind}: peak {runs[kind][-1]['peak_rss_mib']:.0f} MiB, {runs[kind][-1]['seconds']:.1f} s",
                flush=True,
            )
    keys = (
        "peak_rss_mib",
        "baseline_rss_mib",
        "peak_minus_baseline_mib",
        "seconds",
        "rss_after_mib",
        "rss_anon_after_mib",
        "rss_file_after_mib",
        "model_state_mib",
    )
    median = medians(runs, keys)
    ratio = {
        k: median["ours"][k] / median["theirs"][k] for k in ("peak_rss_mib", "peak_minus_baseline_mib", "seconds")
    }
    return {
        "model": name, "path": str(model_dir), "repeats": repeats, "median": median, "ratio_ours_over_theirs": ratio,
        "target_peak_ratio": TARGET_RATIO, "target_met": ratio["peak_rss_mib"] <= TARGET_RATIO, "runs": runs,
    }  # fmt: skip


COLUMNS = (("peak MiB", "peak_rss_mib"), ("base MiB", "baseline_rss_mib"), ("peak-base", "peak_minus_baseline_mib"),
           ("anon after", "rss_anon_after_mib"), ("file after", "rss_file_after_mib"),
           ("state MiB", "model_state_mib"), ("load s", "seconds"))  # fmt: skip


def print_table(results: list[dict[str, Any]]) -> None:
    """One table: per model, their and our medians, then the ours/theirs ratios."""
    head = f"{'model':<26}{'side':<8}" + "".join(f"{title:>11}" for title, _ in COLUMNS)
    print(head + "\n" + "-" * len(head))
    for res in results:
        for kind in ("theirs", "ours"):
            cells = "".join(f"{res['median'][kind][key]:>11.1f}" for _, key in COLUMNS)
            print(f"{res['model']:<26}{kind:<8}{cells}")
        ratios = res["ratio_ours_over_theirs"]
        cells = "".join(f"{ratios[key]:>11.2f}" if key in ratios else f"{'':>11}" for _, key in COLUMNS)
        verdict = "met" if res["target_met"] else "NOT met"
        print(f"{'':<26}{'ratio':<8}{cells}   peak <= {TARGET_RATIO}: {verdict} (median of {res['repeats']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3, help="loads per side for SmolLM2 (median)")
    parser.add_argument("--big-repeats", type=int, default=1, help="loads per side for the 1.1B Llama")
    parser.add_argument("--skip-big", action="store_true", help="only SmolLM2")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the checkpoints are cached")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=("smollm2", "llama-1b"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model)))
        return 0
    if args.prepare:
        prepare = prepare_smollm2 if args.prepare == "smollm2" else prepare_llama_1b
        print(json.dumps(str(prepare(args.workdir))))
        return 0
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = [
        ("smollm2-135m (bf16)", Path(_child("--prepare", "smollm2", "--workdir", str(args.workdir))), args.repeats)
    ]
    if not args.skip_big:
        big = Path(_child("--prepare", "llama-1b", "--workdir", str(args.workdir)))
        models.append(("llama-1.1b random (bf16)", big, args.big_repeats))
    print(f"checkpoints ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = [bench_model(name, path, repeats) for name, path, repeats in models]
    print_table(results)
    write_result(args.output, {
        "benchmark": "load_memory", "description": __doc__.split("\n", 1)[0],
        "command": "python benchmarks/load_memory.py " + " ".join(sys.argv[1:]),
        "versions": {**results[0]["runs"]["ours"][0]["versions"], "bitsandbytes": _version("bitsandbytes"),
                     "python": sys.version.split()[0]},
        "cpu_count": os.cpu_count(), "total_seconds": time.perf_counter() - started, "results": results,
    })  # fmt: skip
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
