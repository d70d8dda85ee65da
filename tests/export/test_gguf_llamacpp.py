"""Real llama.cpp as the judge (marker ``llamacpp``; skipped when ``llama_cpp`` does not import).

Run with ``llama-cpp-python==0.3.36`` installed (docs/export.md: it builds llama.cpp from source, ~12 min on a
2-core machine, so CI skips these): ``python -m pytest -m llamacpp tests/export``.

Tolerances (measured 6e-5 and 4e-5, then given headroom): f32 export with an f32 KV cache, llama.cpp vs the
merged qlorakit model, max |logit difference| <= 5e-4 on logits of size ~30 (llama.cpp sums in another
order, in blocks, with its own RMSNorm / softmax / rotary code); the adapter GGUF on the f32 base vs the
merged f32 export in llama.cpp, <= 5e-4 (it adds ``s (x A^T) B^T`` instead of merging); q8_0 perplexity
within 1% of f32.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from qlorakit.export import export_gguf, export_gguf_adapter
from qlorakit.lora import disable_adapters
from qlorakit.models import resolve_source
from tests.export import llamacpp_judge as judge
from tests.export.conftest import PROMPT_IDS

pytestmark = pytest.mark.llamacpp

LOGIT_ATOL = 5e-4


@pytest.fixture(scope="module")
def f32_llama(smollm2_f32_export):
    return judge.open_llama(smollm2_f32_export)


def test_f32_export_logits_in_llama_cpp_equal_the_merged_models(smollm2_trained, f32_llama):
    model, _ = smollm2_trained
    theirs, ours = judge.llama_logits(f32_llama, PROMPT_IDS), judge.qlorakit_logits(model, PROMPT_IDS)
    assert np.abs(theirs - ours).max() <= LOGIT_ATOL


def test_f32_export_greedy_32_tokens_in_llama_cpp_equal_the_merged_models(smollm2_trained, f32_llama):
    model, _ = smollm2_trained
    assert judge.llama_greedy(f32_llama, PROMPT_IDS, 32) == judge.qlorakit_greedy(model, PROMPT_IDS, 32)


def test_adapter_gguf_on_the_f32_base_gives_the_merged_exports_logits(
    smollm2_trained, smollm2_path, f32_llama, tmp_path
):
    model, _ = smollm2_trained
    with disable_adapters(model):
        base = export_gguf(model, resolve_source(smollm2_path), tmp_path / "base.f32.gguf", "f32", progress=False).path
    adapter = export_gguf_adapter(model, tmp_path / "adapter.gguf", progress=False).path
    with_lora = judge.llama_logits(judge.open_llama(base, lora=adapter), PROMPT_IDS)
    assert np.abs(with_lora - judge.llama_logits(f32_llama, PROMPT_IDS)).max() <= LOGIT_ATOL


def test_chat_completion_in_llama_cpp_uses_the_models_template(smollm2_trained, smollm2_path, f32_llama):
    from qlorakit.models import load_tokenizer

    model, _ = smollm2_trained
    tokenizer = load_tokenizer(smollm2_path)
    messages = [{"role": "user", "content": "Name a colour."}]
    text, chat_format = judge.chat_completion(f32_llama, messages, max_tokens=12)
    assert chat_format == "chat_template.default"  # the GGUF's own Jinja template, not a built-in guess
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    ours = judge.qlorakit_greedy(model, prompt, 12)
    if tokenizer.eos_token_id in ours:
        ours = ours[: ours.index(tokenizer.eos_token_id)]
    assert text == tokenizer.decode(ours)


def test_q8_0_export_perplexity_in_llama_cpp_is_within_1_percent_of_f32(smollm2_trained, smollm2_path, f32_llama,
                                                                        smollm2_f32_export, shared_dir, tmp_path):
    model, _ = smollm2_trained
    q8 = export_gguf(model, resolve_source(smollm2_path), tmp_path / "m.q8_0.gguf", "q8_0", progress=False).path
    text = (shared_dir / "data" / "text" / "wiki_demo.txt").read_text(encoding="utf-8")
    ids = f32_llama.tokenize(text.encode("utf-8"), add_bos=False)[:512]
    q8_llama = judge.open_llama(q8, n_ctx=256)
    f32_small = judge.open_llama(smollm2_f32_export, n_ctx=256)
    ppl = {name: judge.perplexity(lambda c, llm=llm: judge.llama_logits(llm, c), ids, 256)
           for name, llm in (("f32", f32_small), ("q8_0", q8_llama))}
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01
