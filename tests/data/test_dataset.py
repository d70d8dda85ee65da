"""build_datasets end to end: shared-file numbers, the validation split, the summary, the bundled sample."""

from __future__ import annotations

import json

import pytest

from qlorakit.config import DataConfig
from qlorakit.data import build_datasets, default_sample_path, split_indices
from qlorakit.errors import DataError
from tests.helpers.data import label_runs, write_jsonl

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def oasst(tok, data_dir):
    return build_datasets(DataConfig(paths=(str(data_dir / "oasst1" / "oasst1_guanaco_val.jsonl"),), val_size=0.1), tok)


def test_oasst1_numbers_with_default_lengths(oasst):
    train, val, summary = oasst
    assert (len(train), len(val)) == (857, 96)
    assert summary.examples == 953 and summary.formats == {"oasst1": 953}
    assert summary.max_length <= 1024 + 256
    assert summary.truncation.examples == 512
    assert (summary.truncation.source_examples, summary.truncation.target_examples) == (4, 511)
    assert summary.tokens == sum(train.lengths) + sum(val.lengths)


def test_oasst1_labels_are_the_replies(oasst, tok, data_dir):
    train, _, _ = oasst
    rows = [json.loads(line) for line in (data_dir / "oasst1" / "oasst1_guanaco_val.jsonl").open(encoding="utf-8")]
    short = next(i for i, row in enumerate(rows) if row["input"].count("### Human:") == 2 and len(row["output"]) < 300)
    index = next(i for i in range(len(train)) if train.origin(i).endswith(f":{short + 1}"))
    runs = label_runs(tok, train[index])
    assert runs[-1] == rows[short]["output"] + EOS
    assert len(runs) == 2


def test_alpaca_numbers_with_default_lengths(tok, data_dir):
    train, val, summary = build_datasets(DataConfig(paths=(str(data_dir / "alpaca" / "alpaca_en_demo.json"),)), tok)
    assert (len(train), len(val), summary.formats) == (999, 0, {"alpaca": 999})
    assert summary.truncation.source_examples == 0 and summary.truncation.target_examples == 255


def test_val_split_is_deterministic_disjoint_and_sized():
    train, val = split_indices(100, 0.1, seed=3)
    assert (train, val) == split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.1, seed=4)[1] != val
    assert len(split_indices(100, 7, seed=3)[1]) == 7
    assert len(split_indices(10, 0.01, seed=3)[1]) == 1  # a positive fraction holds out at least one
    assert split_indices(5, 0.0, seed=3) == ([0, 1, 2, 3, 4], [])


def test_val_split_that_leaves_nothing_fails():
    with pytest.raises(DataError, match="leaves none for training"):
        split_indices(5, 5, seed=0)


def test_build_split_is_reproducible(tok, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(30)]
    cfg = DataConfig(paths=(str(write_jsonl(tmp_path / "a.jsonl", rows)),), val_size=5, seed=11)
    train1, val1, _ = build_datasets(cfg, tok)
    train2, val2, _ = build_datasets(cfg, tok)
    assert [val1.origin(i) for i in range(5)] == [val2.origin(i) for i in range(5)]
    assert list(train1) == list(train2)
    assert not {train1.origin(i) for i in range(25)} & {val1.origin(i) for i in range(5)}


def test_text_files_are_packed_into_blocks(tok, data_dir):
    cfg = DataConfig(paths=(str(data_dir / "text" / "c4_demo.jsonl"),), block_size=256)
    train, _, summary = build_datasets(cfg, tok)
    assert summary.documents == 300 and summary.blocks == len(train)
    assert set(train.lengths[:-1]) == {256}
    assert summary.target_tokens == summary.tokens


def test_mixed_files_are_validated_before_tokenizing(tok, data_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": ""}])
    with pytest.raises(DataError, match=f"{bad}:1: field 'output': empty"):
        build_datasets(DataConfig(paths=(str(data_dir / "alpaca" / "identity.json"), str(bad))), tok)


def test_summary_text(oasst):
    text = oasst[2].format()
    assert "953 examples (857 train / 96 held out)" in text
    assert "oasst1_guanaco_val.jsonl: oasst1, 953 rows -> 953 examples" in text
    assert "truncated  512 examples" in text
    assert json.loads(json.dumps(oasst[2].as_dict()))["files"][0]["rows"] == 953


def test_dropped_trees_are_summarized(tok, tmp_path):
    rows = [{"message_id": "p", "parent_id": None, "role": "prompter", "text": "Hi"},
            {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "Hello"},
            {"message_id": "q", "parent_id": None, "role": "prompter", "text": "Anyone?"}]
    _, _, summary = build_datasets(DataConfig(paths=(str(write_jsonl(tmp_path / "t.jsonl", rows)),)), tok)
    assert summary.examples == 1 and summary.dropped == {"OASST tree whose root prompt has no assistant reply": 1}
    assert "dropped    1 x OASST tree" in summary.format()


def test_wrong_format_and_missing_file_fail_in_build(tok, data_dir, tmp_path):
    with pytest.raises(DataError, match="field 'response': missing"):
        build_datasets(DataConfig(paths=(str(data_dir / "alpaca" / "identity.json"),), format="dolly"), tok)
    with pytest.raises(DataError, match="no such file"):
        build_datasets(DataConfig(paths=(str(tmp_path / "missing.jsonl"),)), tok)


def test_bundled_sample_is_the_english_oasst1_rows(data_dir):
    path = default_sample_path()
    assert path.is_file() and path.name == "oasst1_sample.jsonl"
    sample = [json.loads(line) for line in path.open(encoding="utf-8")]
    source = [json.loads(line) for line in (data_dir / "oasst1" / "oasst1_guanaco_val.jsonl").open(encoding="utf-8")]
    english = [{k: row[k] for k in ("input", "output", "lang", "message_id", "parent_id")}
               for row in source if row["lang"] == "en"]
    assert sample == english and len(sample) == 419


def test_bundled_sample_builds(tok):
    train, val, summary = build_datasets(DataConfig(paths=(str(default_sample_path()),), val_size=0.05), tok)
    assert (summary.formats, len(train) + len(val), len(val)) == ({"oasst1": 419}, 419, 21)
