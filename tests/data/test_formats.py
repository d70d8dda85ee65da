"""Format detection and conversion to canonical conversations, on the shared files and small written ones."""

from __future__ import annotations

import json

import pytest

from qlorakit.data import Turn, convert_table, load_examples, read_table
from qlorakit.errors import DataError
from tests.helpers.data import write_json, write_jsonl


def convert(path, fmt="auto"):
    return convert_table(read_table(path), fmt)


@pytest.mark.parametrize(
    ("relpath", "fmt", "rows", "examples"),
    [
        ("alpaca/alpaca_en_demo.json", "alpaca", 999, 999),
        ("alpaca/identity.json", "alpaca", 91, 91),
        ("oasst1/oasst1_guanaco_val.jsonl", "oasst1", 953, 953),
        ("chat/oasst1_messages.jsonl", "messages", 953, 953),
        ("text/c4_demo.jsonl", "text", 300, 300),
        ("text/wiki_demo.txt", "text", 1, 1),
        ("text/tinyshakespeare.txt", "text", 1, 1),
    ],
)
def test_shared_files_are_detected(data_dir, relpath, fmt, rows, examples):
    result = convert(data_dir / relpath)
    assert (result.format, result.rows, len(result.examples)) == (fmt, rows, examples)
    assert result.examples[0].origin == f"{data_dir / relpath}:1"


def test_guanaco_text_parses_into_the_same_turns_as_the_messages_file(data_dir):
    guanaco = convert(data_dir / "oasst1" / "oasst1_guanaco_val.jsonl").examples
    messages = convert(data_dir / "chat" / "oasst1_messages.jsonl").examples
    assert [ex.turns for ex in guanaco] == [ex.turns for ex in messages]
    turns = sorted({len(ex.turns) for ex in guanaco})
    assert turns == [2, 4, 6]
    assert sum(len(ex.turns) == 2 for ex in guanaco) == 517


def test_alpaca_keeps_input_as_context(data_dir):
    ex = convert(data_dir / "alpaca" / "alpaca_en_demo.json").examples
    first = ex[0]
    assert first.turns[0] == Turn("user", "Describe a process of making crepes.") and first.context == ""
    assert first.turns[1].content.startswith("Making crepes is an easy and delicious process!")
    assert sum(1 for e in ex if e.context == "") == 587


def test_dolly_rows(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.", "response": "Shakespeare.",
         "category": "closed_qa"},
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "brainstorming"},
    ])
    result = convert(path)
    assert result.format == "dolly"
    assert result.examples[0].turns == (Turn("user", "Who wrote it?"), Turn("assistant", "Shakespeare."))
    assert result.examples[0].context == "Hamlet is a play by Shakespeare." and result.examples[1].context == ""


def test_self_instruct_gives_one_example_per_instance(tmp_path):
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", [
        {"id": "seed_task_0", "instruction": "Is the number even?", "is_classification": True,
         "instances": [{"input": "4", "output": "Yes"}, {"input": "7", "output": "No"}, {"input": "", "output": "?"}]},
        {"id": "seed_task_1", "instruction": "Say hi.", "instances": [{"output": "Hi!"}]},
    ])
    result = convert(path)
    assert result.format == "self-instruct" and result.rows == 2 and len(result.examples) == 4
    assert [e.context for e in result.examples] == ["4", "7", "", ""]
    assert [e.origin for e in result.examples] == [f"{path}:1"] * 3 + [f"{path}:2"]


def test_messages_with_system_turn(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."}]}])
    (ex,) = convert(path).examples
    assert [t.role for t in ex.turns] == ["system", "user", "assistant", "user", "assistant"]


def test_guanaco_whole_dialogue_in_text_field(tmp_path):
    path = write_jsonl(tmp_path / "guanaco.jsonl", [
        {"text": "### Human: Hi there.### Assistant: Hello!### Human: How are you?### Assistant: Fine."}])
    result = convert(path)
    assert result.format == "oasst1"
    assert result.examples[0].turns == (Turn("user", "Hi there."), Turn("assistant", "Hello!"),
                                        Turn("user", "How are you?"), Turn("assistant", "Fine."))


def tree_rows():
    """Two trees. Tree 1 branches; tree 2's root was never answered.

    P1 -> A1 -> P2 -> A3
                   -> A4
             -> P3 (leaf: no answer)
       -> A2
    P5 -> A5 -> P6 (leaf)           P7 (no reply at all)
    """
    edges = [("P1", None, "prompter"), ("A1", "P1", "assistant"), ("A2", "P1", "assistant"), ("P2", "A1", "prompter"),
             ("P3", "A1", "prompter"), ("A3", "P2", "assistant"), ("A4", "P2", "assistant"),
             ("P5", "", "prompter"), ("A5", "P5", "assistant"), ("P6", "A5", "prompter"), ("P7", None, "prompter")]
    return [{"message_id": m, "parent_id": p, "role": r, "text": f"text of {m}", "lang": "en"} for m, p, r in edges]


def test_oasst_trees_give_every_root_to_leaf_conversation(tmp_path):
    path = write_jsonl(tmp_path / "trees.jsonl", tree_rows())
    result = convert(path)
    assert result.format == "oasst1" and result.rows == 11
    paths = [[t.content.removeprefix("text of ") for t in ex.turns] for ex in result.examples]
    assert paths == [["P1", "A2"], ["P1", "A1", "P2", "A3"], ["P1", "A1", "P2", "A4"], ["P5", "A5"]]
    assert [ex.turns[0].role for ex in result.examples] == ["user"] * 4
    assert result.examples[1].origin == f"{path}:6"  # the row of the last assistant message
    assert result.dropped == {"OASST tree whose root prompt has no assistant reply": 1}


def test_csv_and_parquet_are_detected(tmp_path):
    import datasets

    csv_path = tmp_path / "alpaca.csv"
    csv_path.write_text("instruction,input,output\nAdd 2 and 2.,,4\n", encoding="utf-8")
    assert convert(csv_path).format == "alpaca"
    pq = tmp_path / "trees.parquet"
    datasets.Dataset.from_list(tree_rows()).to_parquet(str(pq))
    assert (convert(pq).format, len(convert(pq).examples)) == ("oasst1", 4)


def test_explicit_format_overrides_detection(data_dir):
    result = convert(data_dir / "oasst1" / "oasst1_guanaco_val.jsonl", "text")  # 'text' field holds the input
    assert result.format == "text" and result.examples[0].text.startswith("### Human:")


def test_wrong_explicit_format_fails_with_a_hint(data_dir):
    path = data_dir / "alpaca" / "alpaca_en_demo.json"
    with pytest.raises(DataError) as info:
        convert(path, "dolly")
    message = str(info.value)
    assert message.startswith(f"{path}:1: field 'response': missing; format 'dolly' expects")
    assert "look like format 'alpaca'" in message


def test_txt_with_a_structured_format_fails(data_dir):
    with pytest.raises(DataError, match="a .txt file is plain text"):
        convert(data_dir / "text" / "wiki_demo.txt", "alpaca")


def test_undetectable_fields_fail_listing_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot tell the data format from the fields \['question', 'answer'\]"):
        convert(path)


def test_several_files_each_keep_their_format(data_dir, tmp_path):
    dolly = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "context": "", "response": "b"}])
    results = load_examples([data_dir / "alpaca" / "identity.json", dolly])
    assert [(r.format, len(r.examples)) for r in results] == [("alpaca", 91), ("dolly", 1)]


def test_no_paths_fails():
    with pytest.raises(DataError, match="no data files"):
        load_examples([])


def test_json_array_of_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    path = write_json(tmp_path / "m.json", rows)
    assert convert(path).examples[0].turns == (Turn("user", "Hi"), Turn("assistant", "Yo"))
    assert json.loads(path.read_text())[0] == rows[0]
