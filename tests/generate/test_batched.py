"""The batched decoder (per-row adapters, per-row caches) against decoding each request alone."""

import pytest
import torch

from qlorakit.config import LoraConfig
from qlorakit.generate import generate_ids, use_adapter
from qlorakit.generate.batched import BatchDecoder, RowAdapters
from qlorakit.generate.lean import LeanDecoder
from qlorakit.lora import add_lora
from tests.helpers.lora import randomize_lora_b

PROMPTS = [([5, 9, 33, 7], "x"), ([1, 2], None), ([200, 13, 13, 40, 41, 42, 90], "y"), ([77], "x"), ([3, 4, 5], "y")]


@pytest.fixture
def model(tiny_model):
    model = tiny_model()
    for name, seed in (("x", 1), ("y", 2)):
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), name=name)
        randomize_lora_b(model, name, std=0.5, seed=seed)
    return model


def _alone(model, prompt, adapter, steps):
    """Each step's logits of ``prompt`` decoded alone (greedy) by the lean decoder with ``adapter`` active."""
    use_adapter(model, adapter)
    decoder, ids, out = LeanDecoder(model, len(prompt) + steps), torch.tensor([prompt]), []
    for _ in range(steps):
        out.append(decoder.step(ids))
        ids = torch.tensor([[int(out[-1].argmax())]])
    return out


def test_row_adapters_groups_adjacent_equal_names():
    rows = RowAdapters()
    rows.set(["a", "a", None, "b", "b", "a"])
    assert rows.runs == [("a", slice(0, 2)), (None, slice(2, 3)), ("b", slice(3, 5)), ("a", slice(5, 6))]


def test_mixed_adapters_joining_late_match_each_request_alone(model):
    steps = 6
    expected = [_alone(model, p, a, steps) for p, a in PROMPTS]
    decoder = BatchDecoder(model)
    active, got = [], [[] for _ in PROMPTS]
    for step in range(steps + len(PROMPTS)):  # one new request joins per step (continuous batching)
        if step < len(PROMPTS):
            prompt, adapter = PROMPTS[step]
            sequence = decoder.new_sequence(adapter, len(prompt) + steps)
            logits = decoder.prefill(sequence, prompt)
            got[step].append(logits)
            active.append((step, sequence))
        active.sort(key=lambda item: str(item[1].adapter))  # adjacent adapters, as the server keeps them
        running = [(i, s) for i, s in active if len(got[i]) < steps]
        if running:
            tokens = [int(got[i][-1].argmax()) for i, _ in running]
            logits = decoder.step([s for _, s in running], tokens)
            for row, (i, _) in enumerate(running):
                got[i].append(logits[row])
    for want, have in zip(expected, got, strict=True):
        assert [int(x.argmax()) for x in have] == [int(x.argmax()) for x in want]
        for x, y in zip(have, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert torch.equal(have[0], want[0])  # prefill: the same computation


def test_three_adapters_give_three_different_outputs(model):
    decoder = BatchDecoder(model)
    sequences = [decoder.new_sequence(a, 8) for a in ("x", None, "y")]
    for sequence in sequences:
        decoder.prefill(sequence, [5, 9, 33])
    logits = decoder.step(sequences, [1, 1, 1])
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])


def test_one_row_steps_equal_generate_bit_for_bit(model):
    decoder = BatchDecoder(model)
    sequence = decoder.new_sequence("y", 4 + 5)
    tokens = [int(decoder.prefill(sequence, [5, 9, 33, 7]).argmax())]
    for _ in range(4):
        tokens.append(int(decoder.step([sequence], tokens[-1:])[0].argmax()))
    use_adapter(model, "y")
    assert tokens == list(generate_ids(model, [5, 9, 33, 7], 5))


def test_a_sequence_past_its_max_len_is_refused(model):
    decoder = BatchDecoder(model)
    sequence = decoder.new_sequence(None, 3)
    decoder.prefill(sequence, [1, 2, 3])
    with pytest.raises(Exception, match="exceed"):
        decoder.step([sequence], [4])
