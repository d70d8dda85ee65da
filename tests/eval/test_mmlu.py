"""MMLU: both CSV dialects, the exact prompt, letter tokens, few-shot dropping, the prefix-cached batched
scorer against the one-prompt-at-a-time reference, aggregation, and input errors."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
import transformers

from qlorakit.errors import ConfigError, DataError
from qlorakit.eval import mmlu
from qlorakit.eval.mmlu_categories import CATEGORIES, SUBJECT_CATEGORY
from qlorakit.eval.mmlu_data import (
    Question,
    few_shot_prefix,
    format_question,
    read_questions,
)
from tests.helpers.tiny_llama import tiny_llama_config

ROWS = [["What is 1+1?", "1", "2", "3", "4"], ["Pick the colour,\nplease", "red", "dog", "cat", "cow"],
        ["Largest?", "1", "2", "3", "9"]]


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32)
    return transformers.LlamaForCausalLM(config).eval()


def _write(path, rows, header=False):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        writer.writerows(rows)
    return path


def _folder(tmp_path, subjects=("college_physics", "marketing"), header=True, dev_rows=5):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir(exist_ok=True)
    for n, subject in enumerate(subjects):
        answers = [str(i % 4) for i in range(3)] if header else ["ABCD"[i % 4] for i in range(3)]
        _write(tmp_path / "test" / f"{subject}_test.csv", [r + [a] for r, a in zip(ROWS, answers, strict=True)], header)
        dev = [[f"Dev question {i} of {subject}?", "w", "x", "y", "z",
                str((i + n) % 4) if header else "ABCD"[(i + n) % 4]] for i in range(dev_rows)]
        _write(tmp_path / "dev" / f"{subject}_dev.csv", dev, header)
    return tmp_path


def test_both_dialects_read_the_same_questions(tmp_path):
    with_header = read_questions(
        _write(tmp_path / "a.csv", [r + [a] for r, a in zip(ROWS, "012", strict=True)], header=True))
    letters = read_questions(_write(tmp_path / "b.csv", [r + [a] for r, a in zip(ROWS, "ABC", strict=True)]))
    assert ([(q.question, q.choices, q.answer) for q in with_header]
            == [(q.question, q.choices, q.answer) for q in letters])
    assert with_header[1].question == "Pick the colour,\nplease" and [q.answer for q in letters] == [0, 1, 2]


def test_wrong_column_count_names_file_and_row(tmp_path):
    path = _write(tmp_path / "x_test.csv", [ROWS[0] + ["A"], ROWS[1]])
    with pytest.raises(DataError, match=r"x_test\.csv: row 2: 5 fields, expected 6"):
        read_questions(path)


@pytest.mark.parametrize("answer, header", [("E", False), ("4", True), ("", False)])
def test_answer_outside_a_to_d_or_0_to_3_names_file_and_row(tmp_path, answer, header):
    path = _write(tmp_path / "x_test.csv", [ROWS[0] + ["0" if header else "A"], ROWS[1] + [answer]], header)
    with pytest.raises(DataError, match=rf"x_test\.csv: row {3 if header else 2}: answer '{answer}' is not"):
        read_questions(path)


def test_missing_dev_file_is_an_error_only_with_shots(tmp_path):
    folder = _folder(tmp_path)
    (folder / "dev" / "marketing_dev.csv").unlink()
    with pytest.raises(DataError, match=r"marketing_dev\.csv: missing few-shot file for test subject 'marketing'"):
        mmlu.load_subjects(folder, shots=1)
    assert set(mmlu.load_subjects(folder, shots=0)) == {"college_physics", "marketing"}


def test_prompt_is_the_standard_format():
    q = Question("Q?", ("a", "b", "c", "d"), 2, "f: row 1")
    example = Question("E?", ("1", "2", "3", "4"), 0, "f: row 1")
    assert few_shot_prefix("high_school_physics", [example]) + format_question(q, with_answer=False) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "E?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\n"
        "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


def test_letter_tokens_are_the_spaced_letters_smollm2_writes_after_answer(tokenizer):
    ids = mmlu.letter_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]
    assert tokenizer("Answer: C", add_special_tokens=False)["input_ids"][-1] == ids[2]


def test_a_tokenizer_that_splits_the_answer_letter_is_refused():
    def by_characters(text, add_special_tokens=True):  # "Answer: A" -> one token per character
        return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(ConfigError, match="needs the answer letter to be a single token after 'Answer:'"):
        mmlu.letter_token_ids(by_characters)


def test_long_prompts_drop_examples_from_the_end(tokenizer, tmp_path):
    dev = [Question(f"Example {i} " + "word " * 5, ("a", "b", "c", "d"), 0, "") for i in range(5)]
    test = [Question("Short?", ("a", "b", "c", "d"), 1, ""),
            Question("Long? " + "word " * 100, ("a", "b", "c", "d"), 1, "")]
    full = [len(tokenizer(few_shot_prefix("x", dev[:k]) + format_question(test[1], False))["input_ids"])
            for k in range(6)]
    plans = mmlu.plan_prompts(tokenizer, "x", dev, test, 5, full[3])  # the long question fits with 3 examples, not 4
    assert [p.shots for p in plans] == [5, 3] and not any(p.cut for p in plans)
    assert plans[1].ids == tokenizer(few_shot_prefix("x", dev[:3]) + format_question(test[1], False))["input_ids"]
    tiny = mmlu.plan_prompts(tokenizer, "x", dev, test[1:], 5, 10)
    assert tiny[0].shots == 0 and tiny[0].cut and len(tiny[0].ids) == 10


@pytest.mark.parametrize("side, batch", [("right", 1), ("right", 3), ("left", 2), ("left", 5)])
def test_prefix_cached_batches_equal_the_full_prompt_reference(tiny_model, tokenizer, tmp_path, side, batch):
    data = mmlu.load_subjects(_folder(tmp_path), shots=3)
    dev, tests = data["college_physics"]
    varied = tests + [dataclasses.replace(q, question=q.question + " and more" * (3 * i + 1))
                      for i, q in enumerate(tests)]
    plans = mmlu.plan_prompts(tokenizer, "college_physics", dev, varied, 3, 2048)
    assert len({len(p.ids) for p in plans}) == len(plans)  # every batch of 2+ rows is padded
    letters = mmlu.letter_token_ids(tokenizer)
    fast = mmlu.score_subject(tiny_model, plans, letters, batch, pad_id=0, side=side)
    slow = torch.stack([mmlu.score_reference(tiny_model, p.ids, letters) for p in plans])
    # Same fp32 math in another order (cached prefix, padding): 1e-5 absolute on logits of size ~0.1-1.
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_groups_with_fewer_shots_are_scored_with_their_own_prefix(tiny_model, tokenizer):
    dev = [Question(f"Example {i} " + "word " * 20, ("a", "b", "c", "d"), 0, "") for i in range(3)]
    test = [Question("Short?", ("a", "b", "c", "d"), 1, ""),
            Question("Long? " + "word " * 60, ("a", "b", "c", "d"), 1, "")]
    plans = mmlu.plan_prompts(tokenizer, "x", dev, test, 3, 120)
    assert sorted({p.shots for p in plans}) != [3]  # at least one question lost examples
    letters = mmlu.letter_token_ids(tokenizer)
    fast = mmlu.score_subject(tiny_model, plans, letters, 2)
    slow = torch.stack([mmlu.score_reference(tiny_model, p.ids, letters) for p in plans])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_mean_is_over_subjects_and_categories_pool_questions():
    result = mmlu.MmluResult()
    result.subjects["college_physics"] = mmlu.SubjectResult("college_physics", "STEM", 1, 4, 5, 0, 0, "AAAA")
    result.subjects["marketing"] = mmlu.SubjectResult("marketing", "other", 3, 4, 5, 0, 0, "AAAA")
    result.subjects["virology"] = mmlu.SubjectResult("virology", "other", 0, 2, 5, 1, 0, "AA")
    out = result.as_dict()
    assert out["mean"] == pytest.approx((0.25 + 0.75 + 0.0) / 3)
    assert out["categories"] == {"STEM": 0.25, "other": pytest.approx(3 / 6)}
    assert out["accuracy_all"] == pytest.approx(4 / 10) and out["details"]["virology"]["fewer_shots"] == 1


def test_category_table_covers_all_57_subjects():
    assert len(SUBJECT_CATEGORY) == 57 and set(SUBJECT_CATEGORY.values()) == set(CATEGORIES)
    counts = {c: sum(v == c for v in SUBJECT_CATEGORY.values()) for c in CATEGORIES}
    assert counts == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}


def test_evaluate_mmlu_counts_and_predictions(tiny_model, tokenizer, tmp_path):
    folder = _folder(tmp_path, header=False)
    result = mmlu.evaluate_mmlu(tiny_model, tokenizer, folder, shots=2, batch_size=2, limit=2, progress=False)
    assert list(result.subjects) == ["college_physics", "marketing"]
    for r in result.subjects.values():
        assert r.total == 2 and len(r.predictions) == 2 and set(r.predictions) <= set("ABCD")
        assert r.correct == sum("ABCD".index(p) == a for p, a in zip(r.predictions, [0, 1], strict=True))
