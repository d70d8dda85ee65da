"""Real llama.cpp (through ``llama-cpp-python``) as the judge of a GGUF export, and the qlorakit side of each check.

Used by the ``llamacpp`` tests and by ``benchmarks/gguf_parity.py``. Everything runs on the CPU in fp32:
llama.cpp computes an f32 model in f32 when its KV cache is f32 too (``KV_F32``; its default is f16).

- logits: ``Llama(..., logits_all=True).eval(ids)``, then ``scores[:n]`` (n, vocab);
- greedy decoding: the argmax of the last row, appended and evaluated, ``n`` times (no sampler);
- perplexity: ``exp(mean NLL)`` of tokens 1..n-1 of each ``n_ctx`` chunk given the tokens before it in the
  chunk (the chunk's first token is context only), over the first ``n_tokens`` tokens of a text;
- chat: ``create_chat_completion`` at temperature 0 with the handler llama-cpp-python picks from the GGUF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: Threads llama.cpp may use (the project's machines have 2 cores).
THREADS = 2
#: ``GGML_TYPE_F32``: the KV cache in fp32 (llama.cpp's default f16 cache alone moves SmolLM2's logits by ~2e-2).
KV_F32 = 0


def open_llama(path: str | Path, lora: str | Path | None = None, n_ctx: int = 512):
    """A ``llama_cpp.Llama`` over ``path`` (+ a LoRA adapter GGUF), logits for every position kept."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=n_ctx, logits_all=True,
                 n_threads=THREADS, n_threads_batch=THREADS, n_batch=n_ctx, type_k=KV_F32, type_v=KV_F32,
                 verbose=False, seed=0)  # fmt: skip


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for the sequence ``ids``, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` from llama.cpp."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def qlorakit_logits(model, ids: list[int]) -> np.ndarray:
    """The qlorakit model's fp32 logits (len(ids), vocab)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def qlorakit_greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` from the qlorakit model (full forward each step: exact, short)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _chunk_nll(logits: np.ndarray, chunk: list[int]) -> np.ndarray:
    """NLL of chunk[1:] under logits[:-1] (len(chunk) - 1,), in float64."""
    z = logits[:-1].astype(np.float64)  # (n - 1, vocab)
    log_norm = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    return log_norm - z[np.arange(len(chunk) - 1), chunk[1:]]


def perplexity(logits_of, ids: list[int], n_ctx: int) -> float:
    """``exp(mean NLL)`` over the ``n_ctx`` chunks of ``ids`` (module docstring); ``logits_of(chunk)`` scores one."""
    nll = [_chunk_nll(logits_of(ids[i : i + n_ctx]), ids[i : i + n_ctx]) for i in range(0, len(ids) - n_ctx + 1, n_ctx)]
    return float(np.exp(np.concatenate(nll).mean()))


def chat_completion(llm, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """(text, chat format name) of llama-cpp-python's chat completion at temperature 0."""
    llm.reset()
    result = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
    return result["choices"][0]["message"]["content"], llm.chat_format
