"""Sliding-window perplexity: window semantics, the batched fast path against a token-by-token reference,
input errors, and ``qlorakit eval ppl`` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from qlorakit.cli.main import main
from qlorakit.errors import ConfigError, DataError
from qlorakit.eval.perplexity import (
    check_window,
    perplexity,
    perplexity_reference,
    read_text,
    sliding_windows,
)
from tests.helpers.tiny_llama import tiny_llama_config


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=64, hidden_size=32)
    return transformers.LlamaForCausalLM(config).eval()


def _scored(windows):
    return [t for w in windows for t in range(w.score_from, w.end)]


@pytest.mark.parametrize("n, length, stride", [(40, 16, 5), (40, 16, 1), (33, 8, 7), (17, 32, 4), (100, 10, 9)])
def test_overlapping_windows_score_every_token_but_the_first_exactly_once(n, length, stride):
    windows = sliding_windows(n, length, stride)
    assert _scored(windows) == list(range(1, n))
    assert all(w.end - w.begin <= length and w.begin == i * stride for i, w in enumerate(windows))
    assert windows[-1].end == n and all(w.end < n for w in windows[:-1])


def test_disjoint_windows_skip_each_windows_first_token():
    windows = sliding_windows(40, 16, 16)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 16, 1), (16, 32, 17), (32, 40, 33)]
    assert len(_scored(windows)) == 40 - 3


def test_later_windows_keep_length_minus_stride_tokens_of_context():
    windows = sliding_windows(100, 16, 4)
    assert all(w.score_from - w.begin >= 16 - 4 for w in windows[1:])


@pytest.mark.parametrize("length, stride, batch", [(48, None, 1), (16, 16, 2), (16, 5, 3), (16, 1, 4), (12, 7, 2)])
def test_batched_perplexity_equals_the_token_by_token_reference(tiny_model, length, stride, batch):
    ids = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    fast = perplexity(tiny_model, ids, length, stride, batch_size=batch, progress=False)
    slow = perplexity_reference(tiny_model, ids, length, stride)
    assert (fast.tokens, fast.windows) == (slow.tokens, slow.windows)
    # fp32 forward in a different batch/length layout: sums agree to ~1e-6 relative; 1e-5 leaves margin.
    assert fast.nll_sum == pytest.approx(slow.nll_sum, rel=1e-5)
    assert fast.perplexity == pytest.approx(math.exp(fast.nll_sum / fast.tokens), rel=1e-12)


def test_full_context_window_is_the_plain_full_context_nll(tiny_model):
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0].double(), dim=-1)  # (30, vocab)
    nll = -sum(float(logp[t - 1, ids[t]]) for t in range(1, 30))
    result = perplexity(tiny_model, ids, 64, progress=False)
    assert result.tokens == 29 and result.windows == 1
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)


def test_a_shorter_window_changes_the_result(tiny_model):
    ids = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    assert perplexity(tiny_model, ids, 48, progress=False).nll_sum != pytest.approx(
        perplexity(tiny_model, ids, 8, 8, progress=False).nll_sum, rel=1e-3)


def test_stride_larger_than_the_window_is_refused():
    with pytest.raises(ConfigError, match="stride = 9 > max_seq_len = 8"):
        check_window(8, 9)
    with pytest.raises(ConfigError, match="stride = 0"):
        check_window(8, 0)


def test_empty_text_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        read_text(tmp_path / "empty.txt")


def test_jsonl_documents_are_joined_and_bad_rows_named(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(good) == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: needs a string field 'text'"):
        read_text(bad)


def test_cli_ppl_writes_perplexity_and_token_count(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", str(tiny_dir), "--no-quantize", "--data", str(text), "--max-seq-len", "32",
                 "--stride", "16", "--batch-size", "2", "--output", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == result["text_tokens"] - 1 and result["perplexity"] > 1
    assert "perplexity" in capsys.readouterr().out


def test_cli_ppl_checks_stride_and_file_before_loading(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("")
    args = ["eval", "ppl", "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "o.json")]
    assert main(args + ["--data", str(text)]) == 2
    assert "the file is empty" in capsys.readouterr().err
    assert main(args + ["--data", str(text), "--max-seq-len", "8", "--stride", "16"]) == 2
    assert "stride = 16 > max_seq_len = 8" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
