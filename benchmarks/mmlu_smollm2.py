"""MMLU 5-shot of SmolLM2-135M-Instruct on the shared test subjects: qlorakit NF4 and fp32, plus a plain check.

    OMP_NUM_THREADS=1 python benchmarks/mmlu_smollm2.py [--limit N] [--subjects S ...] [--shots 5]
        [--max-seq-len 2048] [--batch-size 8] [--check-subjects 3] [--check-limit 10] [--output JSON]

Per subject, both qlorakit models score the same prompts with ``qlorakit.eval.mmlu.evaluate_mmlu`` (the
order of the two alternates from subject to subject): ``fp32`` = ``load_model(quant=None)``, the GGUF's
weights dequantized to fp32 linears; ``nf4`` = ``load_model()`` (NF4, block 64, double quantization, fp32
compute), the format ``qlorakit train`` uses. Accuracy, wall time and the share of equal predictions are
recorded per subject; the JSON is rewritten after every subject (``"complete": false`` until the end), so
an interrupted run still leaves an honest partial result.

Independent check: on the first ``--check-subjects`` subjects (first ``--check-limit`` questions each),
plain transformers (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)``) scores
prompts built by this script's own CSV reader and prompt builder (no qlorakit code), one full forward per
prompt, argmax over the logits of the tokens of " A".." D" at the last position. Its predictions are
compared question by question with qlorakit fp32's.

Timings on the shared 2-core CPU are noisy and only comparable within one run. Never asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qlorakit.eval.mmlu import evaluate_mmlu
from qlorakit.eval.mmlu_data import subject_files
from qlorakit.fileio import write_json_atomic
from qlorakit.hardware import peak_rss_mb
from qlorakit.models import load_model
from qlorakit.models.loader import load_tokenizer

from _harness import git_head

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = REPO.parent / "shared/data/mmlu"
DEFAULT_OUTPUT = REPO / "benchmarks/results/mmlu_smollm2.json"


# --- the independent check: plain transformers, its own reader and prompts --------------------------


def _plain_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle) if r]
    if rows and rows[0][0].strip().lower() == "question":
        rows = rows[1:]
    return rows


def _plain_item(row: list[str], answer: bool) -> str:
    text = row[0]
    for letter, choice in zip("ABCD", row[1:5], strict=True):
        text += "\n" + letter + ". " + choice
    text += "\nAnswer:"
    if answer:
        key = row[5].strip()
        text += " " + ("ABCD"[int(key)] if key.isdigit() else key) + "\n\n"
    return text


def plain_predictions(data: Path, subject: str, shots: int, limit: int, model: Any, tokenizer: Any) -> str:
    """Letters predicted by plain transformers for the first ``limit`` test questions of ``subject``."""
    intro = "The following are multiple choice questions (with answers) about " + " ".join(subject.split("_")) + ".\n\n"
    examples = "".join(_plain_item(r, True) for r in _plain_rows(data / "dev" / f"{subject}_dev.csv")[:shots])
    choice_ids = [tokenizer.encode(" " + c, add_special_tokens=False)[0] for c in "ABCD"]
    letters = ""
    for row in _plain_rows(data / "test" / f"{subject}_test.csv")[:limit]:
        encoded = tokenizer(intro + examples + _plain_item(row, False), return_tensors="pt")
        with torch.no_grad():
            last = model(**encoded).logits[0, -1]
        letters += "ABCD"[int(torch.argmax(last[choice_ids]))]
    return letters


# --- the run --------------------------------------------------------------------------------------


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _summary(per_mode: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for mode, subjects in per_mode.items():
        if subjects:
            accs = [s["accuracy"] for s in subjects.values()]
            correct, total = sum(s["correct"] for s in subjects.values()), sum(s["total"] for s in subjects.values())
            out[mode] = {"mean": sum(accs) / len(accs), "accuracy_all": correct / total, "questions": total,
                         "subjects": len(accs), "seconds": sum(s["seconds"] for s in subjects.values())}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    subjects = list(subject_files(args.data, args.subjects))
    tokenizer = load_tokenizer(str(GGUF))
    loaders = {"nf4": lambda: load_model(str(GGUF)), "fp32": lambda: load_model(str(GGUF), quant=None)}
    models = {mode: loaders[mode]() for mode in args.modes.split(",")}
    result: dict[str, Any] = {
        "model": GGUF.name, "data": str(args.data), "shots": args.shots, "limit_per_subject": args.limit,
        "max_seq_len": args.max_seq_len, "batch_size": args.batch_size, "threads": args.threads,
        "git_head": git_head(), "complete": False,
        "model_bytes": {m: _model_bytes(model) for m, model in models.items()},
        "per_subject": {m: {} for m in models}, "prediction_agreement_nf4_fp32": {},
    }
    predictions: dict[str, dict[str, str]] = {m: {} for m in models}
    for index, subject in enumerate(subjects):
        for mode in (list(models) if index % 2 == 0 else list(models)[::-1]):
            started = time.perf_counter()
            r = evaluate_mmlu(models[mode], tokenizer, args.data, shots=args.shots, max_seq_len=args.max_seq_len,
                              batch_size=args.batch_size, limit=args.limit, subjects=[subject], progress=False)
            seconds = time.perf_counter() - started
            s = r.subjects[subject]
            predictions[mode][subject] = s.predictions
            result["per_subject"][mode][subject] = {"accuracy": s.accuracy, "correct": s.correct, "total": s.total,
                                                    "fewer_shots": s.fewer_shots, "seconds": round(seconds, 2)}
        if len(models) == 2:
            same = sum(a == b for a, b in zip(predictions["nf4"][subject], predictions["fp32"][subject], strict=True))
            result["prediction_agreement_nf4_fp32"][subject] = same / len(predictions["fp32"][subject])
        result["summary"] = _summary(result["per_subject"])
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        write_json_atomic(args.output, result)
        scores = {m: result["per_subject"][m][subject] for m in models}
        print(f"{index + 1}/{len(subjects)} {subject}: " + ", ".join(
            f"{m} {s['accuracy']:.3f} ({s['seconds']:.0f}s)" for m, s in scores.items()), flush=True)
    if "fp32" in models:
        result["plain_transformers_check"] = _check(args, subjects[: args.check_subjects], predictions["fp32"])
    result["complete"] = True
    write_json_atomic(args.output, result)
    return result


def _check(args: argparse.Namespace, subjects: list[str], ours: dict[str, str]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    out = {}
    for subject in subjects:
        theirs = plain_predictions(Path(args.data), subject, args.shots, args.check_limit, model, tokenizer)
        mine = ours[subject][: len(theirs)]
        # mine is shorter than theirs when --limit is below --check-limit: compare what both have
        equal = sum(a == b for a, b in zip(mine, theirs, strict=False))
        out[subject] = {"questions": len(theirs), "equal_predictions": equal,
                        "qlorakit_fp32": mine, "plain_transformers": theirs}
    return out


def format_table(result: dict[str, Any]) -> str:
    modes = list(result["per_subject"])
    lines = [f"{'subject':<38}" + "".join(f"{m + ' acc':>10}{m + ' s':>8}" for m in modes) + f"{'agree':>7}"]
    for subject in result["per_subject"][modes[0]]:
        scores = [result["per_subject"][m][subject] for m in modes]
        cells = "".join(f"{s['accuracy']:>10.3f}{s['seconds']:>8.0f}" for s in scores)
        agree = result["prediction_agreement_nf4_fp32"].get(subject)
        lines.append(f"{subject:<38}{cells}" + (f"{agree:>7.2f}" if agree is not None else f"{'-':>7}"))
    for m, s in result["summary"].items():
        lines.append(f"{m}: mean over {s['subjects']} subjects {s['mean']:.4f}, all {s['questions']} questions "
                     f"{s['accuracy_all']:.4f}, {s['seconds']:.0f} s")
    for subject, c in result.get("plain_transformers_check", {}).items():
        lines.append(f"plain transformers check {subject}: {c['equal_predictions']}/{c['questions']} equal predictions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--subjects", nargs="+", help="default: every subject in DATA/test")
    parser.add_argument("--limit", type=int, default=None, help="first N questions per subject (default: all)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="nf4,fp32", choices=["nf4,fp32", "nf4", "fp32"],
                        help="which qlorakit models score (the plain check needs fp32)")
    parser.add_argument("--check-subjects", type=int, default=3)
    parser.add_argument("--check-limit", type=int, default=10)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    result = run(args)
    print(format_table(result))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
