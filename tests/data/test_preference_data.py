"""The preference format (detection, errors), pair tokenization (loss on the completion only), the by-prompt
split, the chosen-then-rejected batch, and the Vicuna judgement converter on the shared files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlorakit.config import DataConfig
from qlorakit.data import convert_table, read_table
from qlorakit.data.pairs import build_pair_datasets, collate_pairs, split_pairs, tokenize_pairs
from qlorakit.data.vicuna_pairs import build_vicuna_pairs
from qlorakit.errors import DataError
from tests.helpers.data import write_jsonl

USER = {"role": "user", "content": "Name a colour."}


def _convert(path: Path):
    return convert_table(read_table(path))


def test_prompt_chosen_rejected_and_message_lists_are_detected_as_preference(tmp_path):
    flat = _convert(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Name a colour.", "chosen": "Red.",
                                                        "rejected": "Seven."}]))
    listed = _convert(write_jsonl(tmp_path / "b.jsonl", [{
        "messages": [{"role": "system", "content": "Be brief."}, USER],
        "chosen": [{"role": "assistant", "content": "Red."}], "rejected": "Seven."}]))
    assert flat.format == listed.format == "preference"
    ex = listed.examples[0]
    assert ex.prompt_turns == 2 and [t.role for t in ex.turns] == ["system", "user", "assistant"]
    assert ex.turns[-1].content == "Red." and ex.rejected[-1].content == "Seven." and ex.rejected[:2] == ex.turns[:2]


@pytest.mark.parametrize(("row", "where", "problem"), [
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "field 'rejected'", "empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen'", "expected a list"),
    ({"messages": [USER], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen[0].role'", "must start with an 'assistant'"),
    ({"messages": [USER, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "field 'messages'", "must end with a 'user'"),
    ({"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
     "field 'messages[0].role'", "unknown role"),
    ({"prompt": "q", "messages": [USER], "chosen": "a", "rejected": "b"}, "field 'messages'", "give the prompt once"),
])
def test_malformed_preference_rows_name_file_row_and_field(tmp_path, row, where, problem):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        _convert(path)
    assert f"{path}:2: {where}" in str(err.value) and problem in str(err.value)


def test_explicit_preference_format_on_other_fields_fails_at_row_one(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'prompt': missing; format 'preference'.*'alpaca'"):
        convert_table(read_table(path), "preference")


@pytest.mark.parametrize("fixture", ["tok", "plain_tok"])  # ChatML template, and the Guanaco fallback
def test_pair_labels_cover_the_completion_only(request, fixture, tmp_path):
    tokenizer = request.getfixturevalue(fixture)
    row = {"messages": [USER, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another."}],
           "chosen": "Green.", "rejected": "No."}
    ex = _convert(write_jsonl(tmp_path / "p.jsonl", [row])).examples
    (pair,), _, dropped = tokenize_pairs(ex, tokenizer, DataConfig(train_on_source=True))
    assert not dropped
    for ids, labels, answer in ((pair.chosen_ids, pair.chosen_labels, "Green."),
                                (pair.rejected_ids, pair.rejected_labels, "No.")):
        scored = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
        assert scored.startswith(answer) and "Blue" not in scored  # the prompt's assistant turn is context only
        assert ids[: len(ids) - len([x for x in labels if x != -100])] == pair.chosen_ids[: len(ids) - len(
            [x for x in labels if x != -100])]  # both sides share the prompt tokens


def test_split_keeps_pairs_of_one_prompt_together_and_is_seeded():
    prompts = [f"q{i // 3}" for i in range(30)]  # 10 prompts x 3 pairs
    train, val = split_pairs(prompts, 0.2, seed=1)
    assert len(val) == 6 and not set(train) & set(val) and sorted(train + val) == list(range(30))
    assert not {prompts[i] for i in train} & {prompts[i] for i in val}
    assert split_pairs(prompts, 0.2, seed=1) == (train, val) and split_pairs(prompts, 0.2, seed=2) != (train, val)
    with pytest.raises(DataError, match="leaves none for training"):
        split_pairs(["same"] * 4, 1, seed=0)


def test_collate_puts_chosen_rows_first_then_rejected_in_one_padded_batch():
    pairs = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4],
              "rejected_labels": [-100, 4], "index": [7]},
             {"chosen_input_ids": [5], "chosen_labels": [5], "rejected_input_ids": [5, 6, 7, 8],
              "rejected_labels": [-100, 6, 7, 8], "index": [2]}]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [5, 6, 7, 8]]
    assert batch["labels"][2].tolist() == [-100, 4, -100, -100]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4] and batch["pair_index"].tolist() == [7, 2]


def test_build_pair_datasets_rejects_a_file_that_is_not_preference_data(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"sft.jsonl: DPO / ORPO train on preference pairs.*'alpaca'"):
        build_pair_datasets(DataConfig(paths=(str(path),)), tok)


def test_vicuna_pairs_from_the_shared_judgements(shared_dir, tmp_path):
    rows, counts = build_vicuna_pairs(shared_dir / "data" / "elo")
    assert counts["judgements"] == 4480 and counts["verdicts"]["tie"] == 600 and counts["verdicts"]["unparsed"] == 13
    assert counts["system_pairs"] == 2240 == counts["pairs"] + sum(counts["dropped_pairs"].values())
    assert counts["pairs"] == len(rows) and {r["votes"] for r in rows} <= {"2-0", "1-0"}
    answers = [json.loads(line) for line in (shared_dir / "data" / "elo" / "vicuna-generations" /
                                            "answer_gpt4.jsonl").open()]
    gpt4 = {a["question_id"]: a["text"] for a in answers}
    first = next(r for r in rows if r["chosen_system"] == "answer-gpt4")
    assert first["chosen"] == gpt4[first["question_id"]] and first["rejected"] != first["chosen"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows[:50])
    assert _convert(path).format == "preference"
    few, few_counts = build_vicuna_pairs(shared_dir / "data" / "elo", per_question=2, seed=0)
    assert len(few) == few_counts["written"] == 160 and few_counts["pairs"] == counts["pairs"]
