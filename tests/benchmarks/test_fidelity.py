"""``benchmarks/fidelity.py``'s building blocks: the split, the row configs, seeds, matches_16bit, resume."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from benchmarks import fidelity as fid
from qlorakit.config import as_dict


def _rows() -> list[dict]:
    """Three two-turn conversations (two rows each) and four single-turn ones."""
    rows = []
    for c in range(3):
        first = f"### Human: question {c} ### Assistant:"
        rows.append({"input": first, "output": f"a{c}"})
        rows.append({"input": f"{first} a{c} ### Human: follow-up {c} ### Assistant:", "output": f"b{c}"})
    rows += [{"input": f"### Human: single {c} ### Assistant:", "output": f"s{c}"} for c in range(4)]
    return rows


def test_split_keeps_conversations_whole_disjoint_and_deterministic():
    rows = _rows()
    train, held = fid.split_by_conversation(rows, fraction=0.3, seed=5)
    assert len(train) + len(held) == len(rows)
    train_keys, held_keys = {fid.conversation_key(r) for r in train}, {fid.conversation_key(r) for r in held}
    assert train_keys.isdisjoint(held_keys)
    assert len(held_keys) == 3  # ceil(0.3 * 7 conversations)
    assert fid.split_by_conversation(rows, fraction=0.3, seed=5) == (train, held)
    assert fid.split_by_conversation(list(reversed(rows)), fraction=0.3, seed=5)[1] == list(reversed(held))
    others = {tuple(r["output"] for r in fid.split_by_conversation(rows, 0.3, s)[1]) for s in range(10)}
    assert len(others) > 1  # the seed decides which conversations are held out


def test_the_real_split_is_by_conversation(shared_dir):
    rows = fid.read_rows(shared_dir / "data/oasst1/oasst1_guanaco_val.jsonl")
    train, held = fid.split_by_conversation(rows)
    assert {fid.conversation_key(r) for r in train}.isdisjoint({fid.conversation_key(r) for r in held})
    assert 0.10 < len(held) / len(rows) < 0.20


def _flat(row: str, seed: int = 0) -> dict:
    cfg = fid.run_config(row, seed, fid.Budget(), "train.jsonl", "out")
    return {f"{section}.{k}": v for section, values in as_dict(cfg).items() if isinstance(values, dict)
            for k, v in values.items()} | {"model": cfg.model}


@pytest.mark.parametrize(("row", "changed"), [
    ("nf4-dq", {"quant.quant_type": "nf4"}),
    ("nf4", {"quant.quant_type": "nf4", "quant.double_quant": False}),
    ("fp4-dq", {"quant.quant_type": "fp4"}),
    ("int4-dq", {"quant.quant_type": "int4"}),
    ("nf4-dq-qv", {"quant.quant_type": "nf4", "lora.targets": ["q_proj", "v_proj"]}),
    ("full-ft", {"train.finetune": "full", "optim.lr": fid.Budget().full_ft_lr}),  # what trains, and its lr
])
def test_rows_differ_from_fp32_in_the_named_thing_only(row, changed):
    base, other = _flat("fp32"), _flat(row)
    diff = {k: other[k] for k in base if base[k] != other[k]}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in diff.items()} == changed
    assert base["quant.quant_type"] == "none" and base["lora.targets"] == "all-linear"


def test_the_seed_sets_initialization_dropout_and_order_and_nothing_else():
    a, b = _flat("nf4-dq", 0), _flat("nf4-dq", 7)
    assert {k for k in a if a[k] != b[k]} == {"train.seed", "data.seed"}
    assert b["train.seed"] == b["data.seed"] == 7


def test_matches_16bit_uses_the_larger_of_the_spread_and_one_percent():
    base = [2.00, 2.10, 2.20]  # mean 2.1, std 0.1 > 1% of the mean
    assert fid.matches_16bit([2.2, 2.2, 2.2], base) and not fid.matches_16bit([2.21, 2.21, 2.21], base)
    tight = [2.0, 2.0, 2.0]  # std 0: 1% of the mean (0.02) decides
    assert fid.matches_16bit([2.019, 2.019], tight) and not fid.matches_16bit([2.021], tight)
    assert fid.matches_16bit([1.981], tight) and not fid.matches_16bit([1.979], tight)


def _run(loss: float) -> dict:
    return {"heldout_loss": loss, "wiki_ppl": 20.0, "wall_s": 1.0, "train_s": 0.5, "curve": [[0, 3.0], [2, loss]],
            "commit": "abc"}


def test_resume_skips_finished_pairs_and_refuses_another_budget(tmp_path):
    budget = fid.Budget(steps=4)
    path = tmp_path / "fidelity.json"
    result = fid.load_result(path, budget)
    assert result["rows"] == {} and fid.pending(result, ["fp32", "nf4"], [0, 1]) == [
        ("fp32", 0), ("fp32", 1), ("nf4", 0), ("nf4", 1)]
    fid.record(result, "fp32", 0, _run(2.0))
    fid.record(result, "fp32", 1, _run(2.2))
    fid.record(result, "nf4", 1, _run(2.5))
    path.write_text(json.dumps(fid.summarize(result)))

    again = fid.load_result(path, budget)
    assert fid.pending(again, ["fp32", "nf4"], [0, 1]) == [("nf4", 0)]
    assert again["rows"]["fp32"]["seeds"] == [0, 1] and again["rows"]["fp32"]["heldout_loss"] == [2.0, 2.2]
    assert again["rows"]["nf4"]["matches_16bit"] is False and again["rows"]["fp32"]["matches_16bit"] is True
    assert again["rows"]["nf4"]["diff_to_fp32"] == pytest.approx(0.4)
    with pytest.raises(SystemExit, match="budget"):
        fid.load_result(path, dataclasses.replace(budget, steps=5))


def test_report_renders_the_table_between_the_markers(tmp_path):
    result = {"commit": "abc", "budget": dataclasses.asdict(fid.Budget()), "rows": {}}
    for seed, loss in enumerate([2.0, 2.1, 2.2]):
        fid.record(result, "fp32", seed, _run(loss))
        fid.record(result, "int4-dq", seed, _run(loss + 1))
    doc = tmp_path / "fidelity.md"
    doc.write_text("# t\n\nbefore\n<!-- fidelity:begin (benchmarks/fidelity.py --report) -->\nold\n"
                   "<!-- fidelity:end -->\n\n## Reading\nkept\n")
    fid.render(fid.summarize(result), doc, plot_path=tmp_path / "p.png")
    text = doc.read_text()
    assert "old" not in text and text.endswith("## Reading\nkept\n") and "before" in text
    assert "| fp32 | 3 | 2.1000 ± 0.1000 | +0.0000 ± 0.1414 |" in text
    assert "| int4-dq | 3 | 3.1000 ± 0.1000 | +1.0000 ± 0.1414 | 20.00 ± 0.00 | n/a | no |" in text
    assert (tmp_path / "p.png").stat().st_size > 0


def test_the_full_ft_row_is_full_finetuning_of_the_fp32_base_at_its_own_lr():
    cfg = fid.run_config("full-ft", 0, fid.Budget(), "train.jsonl", "out")
    assert cfg.full_finetune and not cfg.quant.quantized and cfg.train.compute_dtype == "float32"
    assert cfg.optim.lr == fid.Budget().full_ft_lr == 2e-5 != fid.Budget().lr
    assert "full-ft" in fid.DEFAULT_ROWS and fid.ADDED_ROWS == ("full-ft",)


def test_report_names_the_commit_of_a_row_added_after_the_grid(tmp_path):
    result = {"commit": "grid", "budget": dataclasses.asdict(fid.Budget()), "rows": {}}
    fid.record(result, "fp32", 0, {**_run(2.0), "commit": "grid"})
    assert fid.later_commits(result) == []
    fid.record(result, "full-ft", 0, {**_run(2.3), "commit": "later"})
    (line,) = [x for x in fid.later_commits(result) if x]
    assert "`full-ft` at `later`" in line and "`grid`" not in line
    doc = tmp_path / "fidelity.md"
    fid.render(fid.summarize(result), doc, plot_path=tmp_path / "p.png")
    assert "`full-ft` at `later`" in doc.read_text() and "| full-ft | 1 | 2.3000" in doc.read_text()


def test_add_mmlu_fills_old_rows_seed_major_and_only_when_the_loss_reproduces():
    result = {"commit": "abc", "budget": dataclasses.asdict(fid.Budget()), "rows": {}}
    for row in ("fp32", "nf4"):
        for seed, loss in enumerate([2.0, 2.1]):
            fid.record(result, row, seed, {k: v for k, v in _run(loss).items()})  # recorded before MMLU existed
    for row in result["rows"].values():  # a JSON written before MMLU has no "mmlu" key at all
        del row["mmlu"]
    assert fid.missing_mmlu(result, ["fp32", "nf4"]) == [("fp32", 0), ("nf4", 0), ("fp32", 1), ("nf4", 1)]
    assert fid.add_mmlu(result, "fp32", 1, {**_run(2.1), "mmlu": 0.31})
    assert not fid.add_mmlu(result, "nf4", 0, {**_run(2.0 + 1e-4), "mmlu": 0.9})  # another adapter: refused
    assert result["rows"]["fp32"]["mmlu"] == [None, 0.31] and result["rows"]["nf4"].get("mmlu") in (None, [None, None])
    assert fid.missing_mmlu(result, ["fp32", "nf4"]) == [("fp32", 0), ("nf4", 0), ("nf4", 1)]
    row = fid.summarize(result)["rows"]["fp32"]
    assert row["mmlu_seeds"] == 1 and row["mmlu_mean"] == pytest.approx(0.31) and row["mmlu_std"] == 0.0
    fid.record(result, "fp32", 2, {**_run(2.2), "mmlu": 0.25})  # a new run records its MMLU beside the old ones
    assert result["rows"]["fp32"]["mmlu"] == [None, 0.31, 0.25]
    assert "| fp32 | 3 |" in fid.table(fid.summarize(result)) and "28.0% ± 4.2 (2)" in fid.table(result)


@pytest.fixture(scope="module")
def tiny_smol_dir(shared_dir, save_tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_dir / "models/smollm2-135m-instruct"),
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return save_tiny_llama("fidelity_tiny", tokenizer, vocab_size=len(tokenizer), tie_word_embeddings=True)


def test_one_run_per_base_kind_through_the_trainer(tiny_smol_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "MODEL", tiny_smol_dir)
    budget = fid.Budget(steps=2, eval_every=1, heldout_examples=3, seq_len=64, wiki_tokens=96)
    data = fid.prepare_data(budget, tmp_path)
    runs = {row: fid.run_one(row, 0, budget, data, tmp_path) for row in ("fp32", "nf4-dq")}
    for run in runs.values():
        assert [s for s, _ in run["curve"]] == [0, 1, 2] and run["heldout_loss"] == run["curve"][-1][1]
        assert math.isfinite(run["wiki_ppl"]) and run["wall_s"] >= run["train_s"] > 0
        assert 0.0 <= run["mmlu"] <= 1.0  # 100 questions: a multiple of 1%
        assert abs(run["mmlu"] * 100 - round(run["mmlu"] * 100)) < 1e-9
        assert run["curve"][-1][1] != run["curve"][0][1]  # the adapters moved the held-out loss
    # same weights and data; only the base's storage differs, so the step-0 losses differ but are close
    fp32, nf4 = runs["fp32"]["curve"][0][1], runs["nf4-dq"]["curve"][0][1]
    assert fp32 != nf4 and abs(fp32 - nf4) < 0.05 * fp32


def test_the_full_ft_row_trains_every_weight_through_the_trainer(tiny_smol_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "MODEL", tiny_smol_dir)
    budget = fid.Budget(steps=2, eval_every=1, heldout_examples=3, seq_len=64, wiki_tokens=96)
    data = {**fid.prepare_data(budget, tmp_path), "mmlu": False}
    runs = {row: fid.run_one(row, 0, budget, data, tmp_path) for row in ("fp32", "full-ft")}
    full, lora = runs["full-ft"]["curve"], runs["fp32"]["curve"]
    assert [s for s, _ in full] == [0, 1, 2] and full[0][1] == lora[0][1]  # the same model before any update
    assert full[-1][1] != full[0][1] and full[-1][1] != lora[-1][1]  # every weight moved, not the adapters
    assert math.isfinite(runs["full-ft"]["wiki_ppl"]) and runs["full-ft"]["mmlu"] is None
