"""The KV-cached decoding loop against a full recompute, the 4-bit GEMV path against the reference path,
stop tokens, and streaming text that is split inside multi-byte characters."""

import pytest
import torch

from qlorakit.errors import ConfigError
from qlorakit.generate import SamplingConfig, TextStream, generate_ids, generate_text
from qlorakit.quant.linear import Linear4bit

PROMPT = list(b"Hello, world")


def _greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), use_cache=False).logits  # (1, len, vocab)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_loop_equals_greedy_full_recompute(tiny_model):
    model = tiny_model()
    got = list(generate_ids(model, PROMPT, 12))
    assert got == _greedy_without_cache(model, PROMPT, 12)


def test_gemv_path_gives_the_tokens_of_the_dequantize_path(tiny_model):
    model = tiny_model()
    fast = list(generate_ids(model, PROMPT, 12))
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.use_gemv = False
    assert list(generate_ids(model, PROMPT, 12)) == fast


def test_stop_token_ends_the_stream_and_is_not_text(tiny_model, tokenizer):
    model = tiny_model()
    first = next(iter(generate_ids(model, PROMPT, 1)))
    assert list(generate_ids(model, PROMPT, 10, stop_ids={first})) == [first]
    model.generation_config.eos_token_id = first
    result = generate_text(model, tokenizer, PROMPT, 10)
    assert result.finish_reason == "eos" and result.token_ids == [] and result.text == ""


def test_sampling_is_reproducible_for_a_seed(tiny_model):
    model = tiny_model()
    config = SamplingConfig(temperature=1.0, top_p=0.9, seed=5)
    assert list(generate_ids(model, PROMPT, 8, config)) == list(generate_ids(model, PROMPT, 8, config))


def test_empty_prompt_and_zero_tokens_are_refused(tiny_model):
    with pytest.raises(ConfigError, match="prompt is empty"):
        next(generate_ids(tiny_model(), [], 5))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        next(generate_ids(tiny_model(), PROMPT, 0))


def test_stream_holds_back_partial_utf8_and_pieces_add_up(tokenizer):
    text = "aé€😀b"
    stream = TextStream(tokenizer)
    pieces = [stream.push(byte) for byte in text.encode("utf-8")] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[:3] == ["a", "", "é"]  # the first byte of é alone shows nothing


def test_stream_emits_an_invalid_tail_at_the_end(tokenizer):
    stream = TextStream(tokenizer)
    assert stream.push(ord("x")) == "x"
    assert stream.push(0xE2) == ""  # a lone lead byte of a 3-byte character
    assert stream.finish() == "\ufffd"
