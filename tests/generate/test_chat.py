"""Chat sessions: the history goes through the chat template, commands switch adapters and reset."""

import pytest
import torch

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError
from qlorakit.generate import ChatSession, chat_prompt_ids, generate_ids
from qlorakit.lora import add_lora, lora_layers


def _lines(session, *lines):
    out = []
    for line in lines:
        if not session.handle_line(line, out.append):
            out.append("<quit>")
            break
    return "".join(out)


def test_each_turn_renders_the_whole_history_with_the_generation_prompt(tiny_model, tokenizer):
    session = ChatSession(tiny_model(), tokenizer, max_new_tokens=4)
    first = session.say("hi")
    second = session.say("again")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first.text and session.history[3]["content"] == second.text
    prompt = chat_prompt_ids(tokenizer, session.history[:3])
    assert bytes(prompt).decode("utf-8", errors="replace").endswith("<user>again\n<assistant>")


def test_reply_equals_generation_from_the_rendered_prompt(tiny_model, tokenizer):
    model = tiny_model()
    reply = ChatSession(model, tokenizer, max_new_tokens=6).say("hello")
    expected = list(generate_ids(model, chat_prompt_ids(tokenizer, [{"role": "user", "content": "hello"}]), 6))
    assert reply.token_ids == [t for t in expected if t != 256]


def test_commands_switch_adapter_reset_and_quit(tiny_model, tokenizer):
    model = tiny_model()
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0), name="x")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["x"].weight.normal_(0, 1.0)
    session = ChatSession(model, tokenizer, max_new_tokens=3, adapter="x")
    out = _lines(session, "hi", "/adapter base", "/adapter nope", "/reset", "/what", "/quit", "never read")
    assert "[adapter: base]" in out and "[history cleared]" in out and "[error: no adapter named 'nope'" in out
    assert "unknown command '/what'" in out and out.endswith("<quit>")
    assert session.history == [] and session.adapter is None and not any(m.enabled for m in lora_layers(model).values())


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "x"}])
