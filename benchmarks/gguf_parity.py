"""GGUF export judged by real llama.cpp (llama-cpp-python 0.3.36), and the export's time and peak memory.

    python benchmarks/gguf_parity.py [--workdir DIR] [--ppl-tokens 1024] [--n-ctx 512] [--skip-1b] [--output JSON]

Needs ``pip install -e .[test,gguf-test]`` (llama-cpp-python builds llama.cpp from source; docs/export.md).
On the shared SmolLM2 with an r=8, alpha=16 adapter whose B is random (std 0.02, seed 99; every logit moves):

- exports in every type from the qlorakit reference ``load_model(quant=None)`` + ``load_adapter`` (as
  ``qlorakit export gguf --no-quant``: the source's Q4_1 weights dequantized, plus the adapter);
- f32: llama.cpp's logits for a fixed prompt vs the reference (max |difference|), and 32 greedy tokens;
- perplexity (``tests/export/llamacpp_judge.perplexity``) on the first ``--ppl-tokens`` tokens of
  ``shared/data/text/wiki_demo.txt`` in ``--n-ctx`` chunks, in llama.cpp, per type, and its distance to f32;
- the adapter GGUF on the f32 base export vs the merged f32 export, both in llama.cpp;
- llama.cpp's chat completion over the export vs the reference's greedy reply to the template's prompt;
- time and peak RSS (``VmHWM`` of a fresh child) of ``qlorakit export gguf`` (default: NF4 base) for
  SmolLM2 and for a random Llama of 1.1B parameters (TinyLlama's shape with SmolLM2's 49152-token vocabulary
  and tokenizer, bf16 safetensors, adapter r=8 on every linear), beside the peak of loading that model alone.

``--parts memory`` (or ``parity``) runs one half and keeps the other from the existing JSON. Prints one table
and writes ``benchmarks/results/gguf_parity.json``; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import REPO, git_head, run_child, write_result

sys.path.insert(0, str(REPO))

SMOLLM2 = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = REPO.parent / "shared/data/text/wiki_demo.txt"
DEFAULT_OUTPUT = REPO / "benchmarks/results/gguf_parity.json"
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "mxfp4", "tq2_0", "tq1_0")
PROMPT = "The capital of France is Paris. The capital of Italy is"
CHAT = [{"role": "user", "content": "Name a colour."}]


def _peak_rss_mib() -> float:
    """This process's peak resident set: ``VmHWM``, which exec resets (``ru_maxrss`` keeps the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, args: list[str]) -> dict[str, Any]:
    """In a fresh interpreter: ``export`` runs the CLI on ``args``; ``load`` loads model ``args[0]`` (NF4) +
    adapter ``args[1]``. Returns wall seconds and the peak RSS (``_peak_rss_mib``)."""
    start = time.perf_counter()
    if mode == "export":
        from qlorakit.cli.main import main

        if main(args) != 0:
            raise SystemExit("export failed")
    else:
        from qlorakit.lora import load_adapter
        from qlorakit.models import load_model

        load_adapter(load_model(args[0]), args[1])
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": _peak_rss_mib()}


def _export(source: Path, adapter: Path | None, out: Path, out_type: str, *extra: str) -> dict[str, Any]:
    args = ["export", "gguf", "--model", str(source), "--output", str(out), "--type", out_type, "--overwrite",
            "--no-progress", *(["--adapter", str(adapter)] if adapter else []), *extra]  # fmt: skip
    result = run_child(__file__, ["--child", "export", *args])
    return {**result, "file_mib": out.stat().st_size / 2**20}


def prepare_adapter(workdir: Path) -> Path:
    """The SmolLM2 adapter: r=8, alpha=16, B random (std 0.02)."""
    from qlorakit.config import LoraConfig
    from qlorakit.lora import save_adapter
    from qlorakit.models import load_model
    from tests.helpers.lora import randomize_lora_b

    model = load_model(SMOLLM2, quant=None, lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    randomize_lora_b(model, std=0.02)
    return save_adapter(model, workdir / "smollm2-adapter", overwrite=True)


def prepare_llama_1b(workdir: Path) -> tuple[Path, Path]:
    """The random 1.1B Llama of load_memory.py, with SmolLM2's vocabulary size and tokenizer, and an adapter."""
    import load_memory
    import torch
    from safetensors.torch import save_file

    from qlorakit.config import LoraConfig
    from qlorakit.lora.peft_io import peft_config_dict
    from qlorakit.models import load_tokenizer

    load_memory.LLAMA_1B = {**load_memory.LLAMA_1B, "vocab_size": 49152}  # its generator reads this table
    directory = load_memory.prepare_llama_1b(workdir)
    load_tokenizer(SMOLLM2).save_pretrained(directory)
    shape = load_memory.LLAMA_1B
    kv = shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"]
    dims = {"self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (kv, 2048), "self_attn.v_proj": (kv, 2048),
            "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (5632, 2048), "mlp.up_proj": (5632, 2048),
            "mlp.down_proj": (2048, 5632)}  # fmt: skip
    gen, tensors = torch.Generator().manual_seed(0), {}
    for layer in range(shape["num_hidden_layers"]):
        for name, (out, inp) in dims.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, inp, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 8, generator=gen) * 0.02
    adapter = workdir / "llama-1b-adapter"
    adapter.mkdir(exist_ok=True)
    save_file(tensors, adapter / "adapter_model.safetensors")
    targets = sorted(n.split(".")[1] for n in dims)
    (adapter / "adapter_config.json").write_text(json.dumps(peft_config_dict(LoraConfig(r=8, alpha=16), targets, None)))
    return directory, adapter


def _exports(workdir: Path, reference: Any) -> dict[str, Any]:
    """The parity exports, in this process from the one reference model (as ``export gguf --no-quant``)."""
    from qlorakit.export import export_gguf, export_gguf_adapter
    from qlorakit.lora import disable_adapters
    from qlorakit.models import resolve_source

    source, out = resolve_source(SMOLLM2), {}
    for t in TYPES:
        report = export_gguf(reference, source, workdir / f"smollm2.{t}.gguf", t, overwrite=True, progress=False)
        out[t] = {"seconds": report.seconds, "file_mib": report.nbytes / 2**20}
    with disable_adapters(reference):
        export_gguf(reference, source, workdir / "smollm2-base.f32.gguf", "f32", overwrite=True, progress=False)
    export_gguf_adapter(reference, workdir / "adapter.gguf", overwrite=True, progress=False)
    return out


def parity(workdir: Path, adapter: Path, ppl_tokens: int, n_ctx: int) -> dict[str, Any]:
    """Every llama.cpp check of the module docstring on the SmolLM2 exports."""
    import numpy as np

    from qlorakit.lora import load_adapter
    from qlorakit.models import load_model, load_tokenizer
    from tests.export import llamacpp_judge as judge

    reference = load_model(SMOLLM2, quant=None)
    load_adapter(reference, adapter)
    exports = _exports(workdir, reference)
    f32 = judge.open_llama(workdir / "smollm2.f32.gguf")
    ids = f32.tokenize(PROMPT.encode(), add_bos=False)
    theirs, ours = judge.llama_logits(f32, ids), judge.qlorakit_logits(reference, ids)
    base_with_lora = judge.open_llama(workdir / "smollm2-base.f32.gguf", lora=workdir / "adapter.gguf")
    with_lora = judge.llama_logits(base_with_lora, ids)
    greedy = (judge.llama_greedy(f32, ids, 32), judge.qlorakit_greedy(reference, ids, 32))
    tokenizer = load_tokenizer(SMOLLM2)
    text, chat_format = judge.chat_completion(f32, CHAT, 16)
    prompt = list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    reply = judge.qlorakit_greedy(reference, prompt, 16)
    reply = reply[: reply.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in reply else reply
    wiki = f32.tokenize(WIKI.read_text(encoding="utf-8").encode(), add_bos=False)[:ppl_tokens]
    ppl = {}
    for t in TYPES:
        llm = judge.open_llama(workdir / f"smollm2.{t}.gguf", n_ctx=n_ctx)
        ppl[t] = judge.perplexity(lambda c, llm=llm: judge.llama_logits(llm, c), wiki, n_ctx)
    ppl_ref = judge.perplexity(lambda c: judge.qlorakit_logits(reference, c), wiki, n_ctx)
    return {
        "prompt_tokens": len(ids), "f32_max_abs_logit_diff": float(np.abs(theirs - ours).max()),
        "logit_scale": float(np.abs(ours).max()),
        "f32_argmax_agree": float((theirs.argmax(1) == ours.argmax(1)).mean()),
        "greedy_32_equal": greedy[0] == greedy[1], "greedy_llama_cpp": greedy[0], "greedy_qlorakit": greedy[1],
        "adapter_on_base_max_abs_logit_diff_vs_merged": float(np.abs(with_lora - theirs).max()),
        "chat_format": chat_format, "chat_llama_cpp": text, "chat_qlorakit": tokenizer.decode(reply),
        "chat_equal": text == tokenizer.decode(reply), "ppl_tokens": len(wiki), "n_ctx": n_ctx,
        "ppl_qlorakit_fp32": ppl_ref, "ppl": ppl, "ppl_rel_to_f32": {t: ppl[t] / ppl["f32"] - 1 for t in TYPES},
        "exports": exports,
    }  # fmt: skip


def memory(workdir: Path, adapter: Path, skip_1b: bool) -> dict[str, Any]:
    """Time and peak RSS of the default export (NF4 base) beside loading the same model alone."""
    models = {"smollm2": (SMOLLM2, adapter)}
    if not skip_1b:
        models["llama-1.1b-random"] = prepare_llama_1b(workdir)
    out = {}
    for name, (source, lora) in models.items():
        load = run_child(__file__, ["--child", "load", str(source), str(lora)])
        export = _export(source, lora, workdir / f"{name}.q8_0.gguf", "q8_0")
        out[name] = {"load_nf4_plus_adapter": load, "export_q8_0": export}
    return out


def print_table(result: dict[str, Any]) -> None:
    p = result["parity"]
    print(f"f32 export in llama.cpp: max |logit diff| {p['f32_max_abs_logit_diff']:.2e} "
          f"(logits up to {p['logit_scale']:.1f}), greedy 32 equal: {p['greedy_32_equal']}; adapter on base vs "
          f"merged: {p['adapter_on_base_max_abs_logit_diff_vs_merged']:.2e}; "
          f"chat ({p['chat_format']}) equal: {p['chat_equal']}")
    print(f"perplexity, first {p['ppl_tokens']} wiki tokens, n_ctx {p['n_ctx']} "
          f"(qlorakit fp32: {p['ppl_qlorakit_fp32']:.4f})")
    print(f"{'type':<7}{'MiB':>8}{'ppl':>14}{'vs f32':>14}{'export s':>10}")
    for t, ppl in p["ppl"].items():
        e = p["exports"][t]
        print(f"{t:<7}{e['file_mib']:>8.1f}{ppl:>14.4f}{p['ppl_rel_to_f32'][t]:>+14.2%}{e['seconds']:>10.1f}")
    for name, m in ((k, v) for k, v in result["memory"].items() if k != "commit"):
        load, export = m["load_nf4_plus_adapter"], m["export_q8_0"]
        print(f"{name}: load NF4+adapter {load['seconds']:.1f} s / peak {load['peak_rss_mib']:.0f} MiB; export q8_0 "
              f"{export['seconds']:.1f} s / peak {export['peak_rss_mib']:.0f} MiB / file {export['file_mib']:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlorakit-gguf-parity")
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--parts", default="memory,parity", help="comma-separated: memory, parity")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1:])))
        return 0
    import llama_cpp

    args.workdir.mkdir(parents=True, exist_ok=True)
    adapter = prepare_adapter(args.workdir)
    result = json.loads(args.output.read_text()) if args.output.is_file() else {}
    parts = args.parts.split(",")
    if "memory" in parts:  # first: the children's peaks do not depend on this process, but keep it small anyway
        result["memory"] = {"commit": git_head(), **memory(args.workdir, adapter, args.skip_1b)}
    if "parity" in parts:
        result["parity"] = {"commit": git_head(), "llama_cpp_python": llama_cpp.__version__,
                            **parity(args.workdir, adapter, args.ppl_tokens, args.n_ctx)}  # fmt: skip
    print_table(result)
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
