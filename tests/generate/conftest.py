"""A tiny random NF4 Llama whose vocabulary is bytes, and a byte tokenizer with a toy chat template."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qlorakit.models import quantize_model
from tests.helpers.tiny_llama import tiny_llama_config

EOS = 256
VOCAB = 260


class ByteTokenizer:
    """Token ``i < 256`` is byte ``i``; 256 is EOS. Decoding is UTF-8 with U+FFFD for incomplete bytes."""

    eos_token_id = EOS
    chat_template = "<role>content\\n ... <assistant>"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@pytest.fixture(scope="session")
def _tiny_master():
    torch.manual_seed(4321)
    config = tiny_llama_config(vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    quantize_model(model)
    return model


@pytest.fixture
def tiny_model(_tiny_master):
    """A factory of identical copies of one random NF4 tiny Llama (fp32 compute, eval mode)."""
    return lambda: copy.deepcopy(_tiny_master)


@pytest.fixture
def tokenizer():
    return ByteTokenizer()
