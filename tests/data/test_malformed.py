"""Every malformed row fails before tokenization with ``<file>:<row>: field '<name>': <problem>``."""

from __future__ import annotations

import re

import pytest

from qlorakit.data import convert_table, read_table
from qlorakit.errors import DataError
from tests.helpers.data import write_jsonl

GOOD_ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi."}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
GOOD_GUANACO = {"input": "### Human: Hi ### Assistant:", "output": "Hello."}


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def tree(*rows):
    return [{"message_id": m, "parent_id": p, "role": r, "text": t} for m, p, r, t in rows]


ROOT = ("p1", None, "prompter", "Question?")
CASES = [
    # (id, format, good rows before, bad row, field, problem)
    ("alpaca-missing-output", "auto", [GOOD_ALPACA], {"instruction": "x", "input": ""}, "output", "missing"),
    ("alpaca-output-not-text", "auto", [GOOD_ALPACA], {"instruction": "x", "output": 42}, "output",
     "expected a string, got int"),
    ("alpaca-empty-output", "auto", [GOOD_ALPACA], {"instruction": "x", "output": "  \n"}, "output", "empty"),
    ("alpaca-null-instruction", "auto", [GOOD_ALPACA], {"instruction": None, "output": "y"}, "instruction", "missing"),
    ("alpaca-input-not-text", "auto", [GOOD_ALPACA], {"instruction": "x", "input": ["a"], "output": "y"}, "input",
     "expected a string, got list"),
    ("dolly-missing-response", "dolly", [{"instruction": "a", "context": "", "response": "b"}],
     {"instruction": "a", "context": "c"}, "response", "missing"),
    ("self-instruct-instances-not-list", "auto", [{"instruction": "a", "instances": [{"input": "", "output": "b"}]}],
     {"instruction": "a", "instances": "b"}, "instances", "expected a list, got str"),
    ("self-instruct-no-instances", "auto", [{"instruction": "a", "instances": [{"output": "b"}]}],
     {"instruction": "a", "instances": []}, "instances", "empty list"),
    ("self-instruct-instance-empty-output", "auto", [{"instruction": "a", "instances": [{"output": "b"}]}],
     {"instruction": "a", "instances": [{"output": "b"}, {"input": "x", "output": ""}]}, "instances[1].output",
     "empty"),
    ("messages-not-list", "auto", [GOOD_CHAT], {"messages": "hello"}, "messages", "expected a list, got str"),
    ("messages-item-not-object", "auto", [GOOD_CHAT], {"messages": ["hi"]}, "messages[0]", "expected an object"),
    ("messages-unknown-role", "auto", [GOOD_CHAT], chat(("user", "a"), ("bot", "b")), "messages[1].role",
     "unknown role 'bot'"),
    ("messages-content-not-text", "auto", [GOOD_CHAT], chat(("user", "a"), ("assistant", 3)), "messages[1].content",
     "expected a string"),
    ("messages-empty-answer", "auto", [GOOD_CHAT], chat(("user", "a"), ("assistant", "")), "messages[1].content",
     "empty"),
    ("messages-ends-with-user", "auto", [GOOD_CHAT], chat(("user", "a"), ("assistant", "b"), ("user", "c")), "messages",
     "must end with an 'assistant' message"),
    ("messages-late-system", "auto", [GOOD_CHAT], chat(("user", "a"), ("system", "s"), ("assistant", "b")),
     "messages[1].role", "only allowed as the first message"),
    ("messages-two-users", "auto", [GOOD_CHAT], chat(("user", "a"), ("user", "b"), ("assistant", "c")),
     "messages[1].role", "expected 'assistant' after 'user', got 'user'"),
    ("messages-starts-with-assistant", "auto", [GOOD_CHAT], chat(("assistant", "a")), "messages[0].role",
     "expected 'user' as the first non-system message"),
    ("guanaco-not-open", "auto", [GOOD_GUANACO], {"input": "### Human: Hi ### Assistant: Hello", "output": "x"},
     "input", "must end with '### Assistant:'"),
    ("guanaco-no-turns", "oasst1", [GOOD_GUANACO], {"input": "Hi", "output": "x"}, "input",
     "no '### Human:' turn found"),
    ("guanaco-not-alternating", "auto", [GOOD_GUANACO],
     {"input": "### Human: a ### Human: b ### Assistant:", "output": "x"}, "input", "turn 2 is '### Human:'"),
    ("guanaco-empty-output", "auto", [GOOD_GUANACO], {"input": "### Human: a ### Assistant:", "output": ""},
     "output", "empty"),
    ("text-empty", "auto", [{"text": "fine"}], {"text": ""}, "text", "empty"),
    ("text-not-text", "auto", [{"text": "fine"}], {"text": {"a": 1}}, "text", "expected a string, got dict"),
]


@pytest.mark.parametrize(("fmt", "good", "bad", "field", "problem"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_row_names_file_row_and_field(tmp_path, fmt, good, bad, field, problem):
    path = write_jsonl(tmp_path / "data.jsonl", [*good, bad, *good])
    with pytest.raises(DataError) as info:
        convert_table(read_table(path), fmt)
    expected = f"{path}:{len(good) + 1}: field '{field}': "
    assert str(info.value).startswith(expected), str(info.value)
    assert problem in str(info.value)


TREE_CASES = [
    ("unknown-role", [ROOT, ("a1", "p1", "bot", "x")], 2, "role", "unknown role 'bot'"),
    ("unknown-parent", [ROOT, ("a1", "nope", "assistant", "x")], 2, "parent_id", "no message has id 'nope'"),
    ("duplicate-id", [ROOT, ("p1", None, "prompter", "again")], 2, "message_id", "duplicate id 'p1'"),
    ("root-assistant", [ROOT, ("a0", None, "assistant", "x")], 2, "role",
     "a root message (no parent_id) must be a 'prompter'"),
    ("assistant-to-assistant", [ROOT, ("a1", "p1", "assistant", "x"), ("a2", "a1", "assistant", "y")], 3, "role",
     "replies to a 'assistant' message"),
    ("empty-text", [ROOT, ("a1", "p1", "assistant", " ")], 2, "text", "empty"),
    ("cycle", [ROOT, ("a1", "p2", "assistant", "x"), ("p2", "a1", "prompter", "y")], 2, "parent_id",
     "never reaches a root"),
]


@pytest.mark.parametrize(("rows", "line", "field", "problem"), [c[1:] for c in TREE_CASES],
                         ids=[c[0] for c in TREE_CASES])
def test_malformed_oasst_tree_names_file_row_and_field(tmp_path, rows, line, field, problem):
    path = write_jsonl(tmp_path / "trees.jsonl", tree(*rows))
    with pytest.raises(DataError) as info:
        convert_table(read_table(path))
    assert str(info.value).startswith(f"{path}:{line}: field '{field}': "), str(info.value)
    assert problem in str(info.value)


def test_row_number_is_the_jsonl_line_with_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "a", "output": ""}' + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:4: field 'output': empty")):
        convert_table(read_table(path))


def test_row_number_in_csv_counts_records(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,input,output\na,,b\n"multi\nline",,\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'output': empty")):
        convert_table(read_table(path))


def test_mixed_value_types_across_jsonl_rows_are_reported_per_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_ALPACA, {"instruction": "x", "output": 3.5}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'output': expected a string, got float")):
        convert_table(read_table(path))
