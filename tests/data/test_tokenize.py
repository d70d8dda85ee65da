"""Templates and tokenization: loss exactly on the answers (+EOS), truncation counted, text packed."""

from __future__ import annotations

import copy

import pytest

from qlorakit.config import DataConfig
from qlorakit.data import (
    ALPACA_PROMPT,
    Example,
    Turn,
    alpaca_prompt,
    generation_prompt,
    pack_documents,
    render,
    tokenize_conversations,
)
from qlorakit.errors import DataError
from tests.helpers.data import label_runs, masked_text

EOS = "<|im_end|>"
MULTI = (Turn("user", "What is 2+2?"), Turn("assistant", "It is 4."),
         Turn("user", "And 3+3?"), Turn("assistant", "Six."))


def tokenized(examples, tokenizer, **cfg):
    items, stats, dropped = tokenize_conversations(examples, tokenizer, DataConfig(**cfg))
    return [{"input_ids": x.input_ids, "labels": x.labels} for x in items], stats, dropped


def chat(*turns, fmt="messages"):
    return Example(fmt, "mem:1", tuple(turns))


def test_alpaca_prompt_is_the_papers():
    assert ALPACA_PROMPT.startswith("Below is an instruction that describes a task, paired with an input that provides "
                                    "further context. Write a response that appropriately completes the request.")
    assert alpaca_prompt("Add.", "2 2").endswith("### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response: ")
    assert alpaca_prompt("Add.") == ("Below is an instruction that describes a task. Write a response that "
                                     "appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
                                     "### Response: ")


def test_alpaca_labels_are_the_answer_and_eos(tok):
    ex = Example("alpaca", "mem:1", (Turn("user", "Add the numbers."), Turn("assistant", "The sum is 4.")),
                 context="2 and 2")
    ((item,), _, _) = tokenized([ex], tok)
    assert label_runs(tok, item) == ["The sum is 4." + EOS]
    assert masked_text(tok, item) == alpaca_prompt("Add the numbers.", "2 and 2")
    assert tok.decode(item["input_ids"]) == alpaca_prompt("Add the numbers.", "2 and 2") + "The sum is 4." + EOS


def test_chat_template_multi_turn_trains_on_every_answer(tok):
    ((item,), _, _) = tokenized([chat(*MULTI)], tok)
    assert label_runs(tok, item) == ["It is 4." + EOS, "Six." + EOS]
    full = tok.apply_chat_template([{"role": t.role, "content": t.content} for t in MULTI], tokenize=False)
    assert tok.decode(item["input_ids"]) == full.removesuffix("\n")  # the template's text, nothing after the last EOS
    assert "<|im_start|>assistant\n" in masked_text(tok, item) and "What is 2+2?" in masked_text(tok, item)


def test_chat_template_single_turn(tok):
    ((item,), _, _) = tokenized([chat(Turn("user", "Hi"), Turn("assistant", "Hello!"))], tok)
    assert label_runs(tok, item) == ["Hello!" + EOS]
    assert masked_text(tok, item).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_guanaco_without_chat_template(plain_tok):
    ((item,), _, _) = tokenized([chat(*MULTI, fmt="oasst1")], plain_tok)
    assert label_runs(plain_tok, item) == ["It is 4." + EOS, "Six." + EOS]
    assert plain_tok.decode(item["input_ids"]) == ("### Human: What is 2+2? ### Assistant: It is 4." + EOS
                                                   + " ### Human: And 3+3? ### Assistant: Six." + EOS)


def test_chat_template_switch_off_uses_guanaco(tok):
    ((item,), _, _) = tokenized([chat(*MULTI)], tok, chat_template=False)
    assert tok.decode(item["input_ids"]).startswith("### Human: What is 2+2? ### Assistant: It is 4.")


def test_system_turn_in_guanaco(plain_tok):
    segments = render(chat(Turn("system", "Be brief."), *MULTI[:2]), plain_tok)
    assert segments[0].text == "Be brief. ### Human: What is 2+2? ### Assistant: "


def test_train_on_source_unmasks_the_prompt(tok):
    ((item,), _, _) = tokenized([chat(*MULTI)], tok, train_on_source=True)
    assert item["labels"] == item["input_ids"]


def test_generation_prompt_matches_training_prompt(tok, plain_tok):
    ((item,), _, _) = tokenized([chat(*MULTI[:2])], plain_tok)
    assert generation_prompt(MULTI[:1], plain_tok) == masked_text(plain_tok, item)
    assert generation_prompt(MULTI[:1], tok).endswith("<|im_start|>assistant\n")


def test_template_that_rewrites_earlier_turns_is_rejected(tok):
    unstable = copy.deepcopy(tok)
    unstable.chat_template = ("{{ messages | length }} turns\n"
                              "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    with pytest.raises(DataError, match="mem:1: the tokenizer's chat template is not prefix-stable"):
        tokenized([chat(*MULTI)], unstable)


def test_template_without_eos_gets_eos_appended_and_headers_masked(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ((item,), _, _) = tokenized([chat(*MULTI)], bare)
    assert label_runs(bare, item) == ["It is 4." + EOS, "Six." + EOS]
    assert masked_text(bare, item) == "[user] What is 2+2?\n[assistant] \n[user] And 3+3?\n[assistant] "


def test_truncation_keeps_answer_start_and_prompt_end_and_counts(tok):
    prompt, answer = " ".join(["word"] * 40), " ".join(["reply"] * 30)
    ex = Example("alpaca", "mem:1", (Turn("user", prompt), Turn("assistant", answer)))
    source_ids = tok(alpaca_prompt(prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ((item,), stats, _) = tokenized([ex], tok, source_max_len=20, target_max_len=10)
    assert item["input_ids"] == source_ids[-20:] + answer_ids[:10]
    assert item["labels"] == [-100] * 20 + answer_ids[:10]
    assert (stats.examples, stats.source_examples, stats.target_examples) == (1, 1, 1)
    assert (stats.source_tokens, stats.target_tokens) == (len(source_ids) - 20, len(answer_ids) - 10)


def test_short_examples_are_not_counted_as_truncated(tok):
    (_, stats, _) = tokenized([chat(*MULTI)], tok)
    assert stats.examples == stats.source_tokens == stats.target_tokens == 0


def test_multi_turn_source_is_everything_before_the_last_answer(tok):
    ((full,), _, _) = tokenized([chat(*MULTI)], tok)
    last_answer = len(tok("Six." + EOS, add_special_tokens=False)["input_ids"])
    ((cut,), stats, _) = tokenized([chat(*MULTI)], tok, source_max_len=12)
    assert cut["input_ids"] == full["input_ids"][-(12 + last_answer):]
    assert stats.source_tokens == len(full["input_ids"]) - 12 - last_answer and stats.target_tokens == 0


def test_max_seq_len_bounds_the_whole_example(tok):
    (items, stats, _) = tokenized([chat(*MULTI)], tok, max_seq_len=16)
    assert len(items[0]["input_ids"]) == 16 and stats.examples == 1


def test_packing_joins_documents_with_eos_into_blocks(tok):
    docs = [Example("text", f"mem:{i}", text=f"Document number {i} says hello.") for i in range(1, 8)]
    blocks = pack_documents(docs, tok, block_size=16)
    stream = [t for d in docs for t in tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [t for b in blocks for t in b.input_ids] == stream
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and 2 <= len(blocks[-1].input_ids) <= 16
    assert all(b.labels == b.input_ids for b in blocks)
    assert sum(t == tok.eos_token_id for t in stream) == 7
    assert blocks[0].origin == "mem:1" and blocks[-1].origin == "mem:7"


def test_bos_of_a_llama_style_tokenizer_survives_source_truncation(plain_tok):
    bos_tok = copy.deepcopy(plain_tok)
    bos_tok.add_bos_token = True  # now prepends <|im_start|> (id 1) like Llama's <s>
    ex = Example("alpaca", "mem:1", (Turn("user", " ".join(["word"] * 40)), Turn("assistant", "Done.")))
    ((item,), stats, _) = tokenized([ex], bos_tok, source_max_len=10)
    assert item["input_ids"][0] == bos_tok.bos_token_id and item["labels"][0] == -100
    assert len(item["input_ids"]) == 10 + len(bos_tok("Done.", add_special_tokens=False)["input_ids"]) + 1
    assert stats.source_examples == 1
    assert plain_tok("a")["input_ids"] == plain_tok("a", add_special_tokens=False)["input_ids"]  # SmolLM2: no BOS
