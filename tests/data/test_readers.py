"""Readers: JSON parsed here (held to ``datasets``), the others through it; 1-based positions; clear errors."""

from __future__ import annotations

import pytest

from qlorakit.data import read_table
from qlorakit.errors import DataError
from tests.helpers.data import write_json, write_jsonl


def test_jsonl_positions_are_line_numbers_even_with_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n\n{"text": "two"}\n\n{"text": "three"}\n', encoding="utf-8")
    table = read_table(path)
    assert table.kind == "jsonl"
    assert [r["text"] for r in table.rows] == ["one", "two", "three"]
    assert table.positions == [1, 4, 6]
    assert table.where(2) == f"{path}:6"


def test_json_array_positions_are_record_numbers(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    table = read_table(path)
    assert table.kind == "json" and table.positions == [1, 2]
    assert table.columns == ("instruction", "output")


def test_json_suffix_holding_json_lines_is_read_as_lines(data_dir):
    table = read_table(data_dir / "mmlu" / "qlora" / "zero_shot_mmlu_val.json")  # JSON Lines despite the name
    assert table.kind == "jsonl" and len(table.rows) == 1531 and table.positions[-1] == 1531


def test_csv_cells_are_strings_and_empty_cells_empty(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,input,output\nAdd,,42\n"two\nlines",x,007\n', encoding="utf-8")
    table = read_table(path)
    assert table.rows == [
        {"instruction": "Add", "input": "", "output": "42"},
        {"instruction": "two\nlines", "input": "x", "output": "007"},
    ]
    assert table.positions == [1, 2]


def test_parquet(tmp_path):
    import datasets

    path = tmp_path / "a.parquet"
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).to_parquet(str(path))
    table = read_table(path)
    assert table.kind == "parquet" and table.rows == [{"text": "a"}, {"text": "b"}]


def test_txt_is_one_document_with_newlines_kept(data_dir):
    table = read_table(data_dir / "text" / "tinyshakespeare.txt")
    assert len(table.rows) == 1
    assert table.rows[0]["text"].startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:")
    assert len(table.rows[0]["text"]) == 1_115_394


def test_reading_writes_nothing_next_to_the_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "b.csv").write_text("text\ny\n", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    read_table(tmp_path / "a.jsonl")
    read_table(tmp_path / "b.csv")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "the file is empty"),
        ("blank.jsonl", "\n  \n", "the file is empty"),
        ("empty.json", "[]", "no rows"),
        ("empty.txt", "\n\n", "the file is empty"),
        ("header.csv", "instruction,output\n", "no rows"),
        ("a.tsv", "x", "unsupported file type"),
    ],
)
def test_empty_or_unsupported_files_fail_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        read_table(path)
    assert str(path) in str(info.value)


def test_missing_file_fails_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_table(tmp_path / "nope.jsonl")


def test_broken_json_lines_fail_with_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken",\n{"text": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_table(path)


def test_broken_json_array_fails_with_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "ok"},\n {"text": "no closing quote}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_table(path)


def test_json_row_that_is_not_an_object_fails(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n["a", "list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: a row must be a JSON object"):
        read_table(path)


def test_ragged_csv_fails_naming_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n1,2,3,4\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}: cannot parse as CSV"):
        read_table(path)


def test_invalid_utf8_text_fails_with_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"{path}:3: not valid UTF-8"):
        read_table(path)


def _datasets_rows(path) -> list[dict]:
    """The oracle: ``datasets.load_dataset("json")``'s rows, with a throw-away cache."""
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory() as cache:
        return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache).to_list()


@pytest.mark.parametrize("name", ["oasst1/oasst1_guanaco_val.jsonl", "chat/oasst1_messages.jsonl",
                                  "alpaca/alpaca_en_demo.json", "alpaca/identity.json", "text/c4_demo.jsonl",
                                  "prompts/mt_bench_question.jsonl", "prompts/mt_bench_reference_answer_gpt-4.jsonl",
                                  "prompts/fastchat_judge_prompts.jsonl", "mmlu/qlora/zero_shot_mmlu_val.json"])
def test_json_rows_equal_what_datasets_reads_from_the_shared_data(data_dir, name):
    path = data_dir / name
    assert read_table(path).rows == _datasets_rows(path)


def test_json_rows_equal_what_datasets_reads_from_the_bundled_sample():
    from qlorakit.data.dataset import default_sample_path

    path = default_sample_path()
    assert read_table(path).rows == _datasets_rows(path)


def test_unify_fills_missing_fields_of_a_row_and_keeps_nested_objects_as_datasets_does(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}], "meta": {"lang": "en"}},
            {"messages": [{"role": "assistant", "content": "b", "name": "x"}, {"role": "user"}], "id": 3},
            {"meta": {"tags": [{"k": 1}, {"v": 2}]}},
            {"messages": []}]  # fmt: skip
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    table = read_table(path)
    assert table.rows == _datasets_rows(path)
    assert table.rows[0] == {"messages": [{"role": "user", "content": "a"}], "meta": {"lang": "en"}, "id": None}
    assert table.rows[2] == {"messages": None, "meta": {"tags": [{"k": 1}, {"v": 2}]}, "id": None}
    assert table.columns == ("messages", "meta", "id")
    assert rows[3] == {"messages": []}  # the parsed rows are not changed


def test_reading_json_does_not_import_datasets(tmp_path):
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y", "id": 1}])
    code = ("import sys; from qlorakit.data import read_table; t = read_table(sys.argv[1]); "
            "assert t.rows[0] == {'text': 'x', 'id': None}, t.rows; "
            "print(sorted({'datasets', 'pandas', 'pyarrow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
