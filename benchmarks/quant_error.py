"""NF4 vs FP4 vs INT4: reconstruction error and perplexity of a real model (a script, not a test).

    python benchmarks/quant_error.py [--model GGUF] [--text TXT] [--tokens 8192] [--output JSON]

1. The ``qlorakit quant-report`` tables (``qlorakit.quant.report``): error of dequantize(quantize(x)) on
   N(0,1), on Student-t df=3 scaled to unit std, and on the 210 decoder linear weights of the GGUF model
   (element-weighted), for nf4/fp4/int4 x double quant on/off at blocksize 64; plus quantize/dequantize
   throughput next to bitsandbytes.
2. Perplexity of the model (transformers ``LlamaForCausalLM``, fp32 compute) with its dequantized-GGUF
   fp32 weights, and with every decoder linear weight (q, k, v, o, gate, up, down; not the embedding,
   the tied lm_head or the norms) replaced by ``dequantize_4bit(quantize_4bit(w, type, 64, dq))`` in
   fp32 — the values ``Linear4bit.from_linear`` would use, written into ``linear.weight`` instead of
   swapping the module (same math, simpler). Text: the first ``--tokens`` tokens of ``--text``
   (tokenized without special tokens), cut into non-overlapping windows of ``--window`` tokens; each
   window is scored on its ``window - 1`` next-token predictions and ppl = exp(total NLL / predictions).

The model file is llama.cpp Q4_1 (already 4-bit), so each format here is a second rounding on top of
a Q4_1 grid. The QLoRA paper's numbers (Table 2: mean Pile-CC perplexity over OPT, BLOOM, LLaMA and
Pythia 125M-13B; NF4 with double quant, FP4 E2M1, INT4) are printed alongside for the ORDER only: the
model, the data and the baseline differ, so the values are not comparable.

Writes ``benchmarks/results/quant_error.json`` atomically and prints one table. Time with the defaults on
2 CPU cores: 377 s measured with other jobs sharing the cores for part of the run (a 1024-token fp32
forward takes ~2.4 s on idle cores, 56 of them in all); 854 s when the load average stayed at 5-6.
Lower --tokens to go faster.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.quant import dequantize_4bit, quantize_4bit, report

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_MODEL = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = SHARED / "data/text/wiki_demo.txt"
DEFAULT_OUTPUT = REPO / "benchmarks/results/quant_error.json"
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_PILE_CC_PPL = {"nf4": 27.41, "fp4": 31.07, "int4": 34.34}
PAPER_NOTE = (
    "QLoRA paper Table 2: mean Pile Common Crawl perplexity over OPT/BLOOM/LLaMA/Pythia 125M-13B for "
    "NFloat4 + DQ, Float4 (E2M1), Int4; a different model and data, compare the order only"
)
EXPECTED_ORDER = "nf4 < fp4 < int4"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF model file")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="plain-text file for perplexity")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of --text to score (default 8192)")
    parser.add_argument("--window", type=int, default=1024, help="non-overlapping window length (default 1024)")
    parser.add_argument("--numel", type=int, default=4_194_304, help="elements of the synthetic tensors")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats of the throughput table")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result path")
    return parser.parse_args(argv)


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- model and text --------------------------------------------------------------------------------


def load_model(model_path: Path) -> tuple[nn.Module, Any]:
    """(LlamaForCausalLM in fp32 eval mode, tokenizer) from a GGUF file through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not model_path.is_file():
        sys.exit(f"model not found: {model_path}; pass --model PATH.gguf")
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    return model.eval(), tok


def token_windows(tok: Any, text_path: Path, tokens: int, window: int) -> torch.Tensor:
    """The first ``tokens`` tokens (rounded down to whole windows) as (windows, window) int64."""
    text = text_path.read_text(encoding="utf-8")
    ids = tok(text[: tokens * 8], add_special_tokens=False)["input_ids"]  # ~4.7 chars/token in English
    if len(ids) < tokens:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    count = min(tokens, len(ids)) // window
    if count == 0:
        sys.exit(f"{text_path} has {len(ids)} tokens, fewer than one window of {window}; lower --window")
    return torch.tensor(ids[: count * window], dtype=torch.int64).view(count, window)


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's q/k/v/o/gate/up/down ``nn.Linear`` modules by qualified name."""
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_SUFFIXES
    }
    if not linears:
        sys.exit("no q/k/v/o/gate/up/down linear layers found in the model")
    return linears


# --- perplexity ------------------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """exp(mean next-token NLL) over all windows; windows: (n, window) int64."""
    nll_sum, predictions = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1].float()  # (window - 1, vocab)
        nll_sum += float(nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
        predictions += ids.numel() - 1
    return {"ppl": math.exp(nll_sum / predictions), "nll": nll_sum / predictions, "predictions": predictions}


def set_weights(linears: dict[str, nn.Linear], originals: dict[str, torch.Tensor], config: tuple[str, bool] | None):
    """Write the original weights (config None) or their 4-bit round trip into every target linear.

    Returns the element-weighted error of the written weights (a cross-check of the GGUF error table).
    """
    sums = report.ErrorSums()
    for name, linear in linears.items():
        w = originals[name]  # (out, in) fp32
        if config is None:
            linear.weight.data.copy_(w)
            continue
        q = quantize_4bit(w, config[0], report.BLOCKSIZE, config[1], name=name + ".weight")
        w_hat = dequantize_4bit(q, torch.float32)
        sums.add(w, w_hat)
        linear.weight.data.copy_(w_hat)
    return sums.as_dict() if sums.numel else None


def perplexity_rows(model: nn.Module, windows: torch.Tensor, start: float) -> list[dict[str, Any]]:
    """Perplexity with the fp32 weights, then with each (quant_type, double_quant) round trip."""
    linears = target_linears(model)
    originals = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    rows = []
    for config in [None, *report.CONFIGS]:
        error = set_weights(linears, originals, config)
        begin = time.perf_counter()
        quant_type, double_quant = config or (None, None)
        name = "fp32 (dequantized GGUF)" if config is None else quant_type + (" + dq" if double_quant else "")
        row = {"weights": name, "quant_type": quant_type, "double_quant": double_quant}
        row |= perplexity(model, windows)
        row |= {"seconds": time.perf_counter() - begin, "weight_rel_rms_error": error and error["rel_rms_error"]}
        row["paper_pile_cc_ppl"] = PAPER_PILE_CC_PPL.get(row["quant_type"])
        rows.append(row)
        log(f"perplexity {row['weights']}: {row['ppl']:.3f} ({row['seconds']:.0f}s)", start)
    set_weights(linears, originals, None)
    return rows


# --- orderings and table ---------------------------------------------------------------------------


def orderings(errors: list[dict[str, Any]], ppl_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Observed order of the three formats per source and double-quant setting, vs nf4 < fp4 < int4."""
    result: dict[str, Any] = {"expected": EXPECTED_ORDER}
    for source in dict.fromkeys(r["source"] for r in errors):
        for dq in (True, False):
            for key in ("rms_error", "mean_abs_error"):
                result[f"{key} {source} dq={'on' if dq else 'off'}"] = report.error_ordering(errors, source, dq, key)
    for dq in (True, False):
        chosen = sorted((r for r in ppl_rows if r["double_quant"] is dq), key=lambda r: r["ppl"])
        result[f"perplexity dq={'on' if dq else 'off'}"] = " < ".join(r["quant_type"] for r in chosen)
    return result


def format_perplexity(result: dict[str, Any]) -> str:
    p = result["perplexity"]
    lines = [
        (f"perplexity, fp32 compute: {p['text']}, first {p['tokens']} tokens, {p['windows']} non-overlapping "
        f"windows of {p['window']} ({p['rows'][0]['predictions']} predictions)"),
        f"{'weights':<26}{'ppl':>9}{'NLL':>9}{'vs fp32':>9}{'weight rel rms':>16}{'paper Pile-CC':>15}",
    ]
    base = p["rows"][0]["ppl"]
    for r in p["rows"]:
        rel = "-" if r["weight_rel_rms_error"] is None else f"{r['weight_rel_rms_error']:.4f}"
        paper = "-" if r["paper_pile_cc_ppl"] is None else f"{r['paper_pile_cc_ppl']:.2f}"
        lines.append(f"{r['weights']:<26}{r['ppl']:>9.3f}{r['nll']:>9.4f}{r['ppl'] / base:>9.3f}{rel:>16}{paper:>15}")
    lines.append(f"paper column: {PAPER_NOTE}")
    return "\n".join(lines)


def format_orderings(order: dict[str, Any]) -> str:
    lines = [f"order of the formats (expected {order['expected']}):"]
    for key, value in order.items():
        if key != "expected":
            lines.append(f"  {key:<40}{value:<20}{'holds' if value == order['expected'] else 'DOES NOT hold'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    rep = report.build_report(args.numel, args.repeats, None)
    log("synthetic error table and throughput done", start)
    rep["errors"] += report.error_rows("model", (w for _, w in report.gguf_linear_weights(args.model)))
    rep["sources"]["model"] = f"the 210 decoder linear weights of {args.model.name} (GGUF Q4_1), element-weighted"
    log("model weight error table done", start)
    model, tok = load_model(args.model)
    windows = token_windows(tok, args.text, args.tokens, args.window)
    log(f"model loaded, {windows.numel()} tokens in {len(windows)} windows", start)
    rows = perplexity_rows(model, windows, start)
    rep["perplexity"] = {
        "model": args.model.name, "text": args.text.name, "tokens": windows.numel(), "window": args.window,
        "windows": len(windows), "compute_dtype": "float32", "method": "weight.data <- dequantize(quantize(w))",
        "paper_note": PAPER_NOTE, "rows": rows,
    }
    rep["order"] = orderings(rep["errors"], rows)
    rep["seconds_total"] = time.perf_counter() - start
    print("\n\n".join([report.format_report(rep), format_perplexity(rep), format_orderings(rep["order"])]))
    print(f"\ntotal {rep['seconds_total']:.0f}s; wrote {report.write_json_atomic(args.output, rep)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
