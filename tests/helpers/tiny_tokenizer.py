"""A small byte-level BPE tokenizer with a ChatML chat template, built in milliseconds (no download, no GGUF).

Any text encodes (byte-level), the vocabulary is a few hundred tokens (so a tiny model's head stays tiny),
``<|im_end|>`` is EOS, and ``apply_chat_template`` renders ``<|im_start|>role\\ncontent<|im_end|>\\n`` turns.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT = (
    "What is the capital of France? The capital of France is Paris. Once upon a time there was a small model "
    "that answered questions about cities, rivers and numbers. Hello, how are you today? I am fine, thank you. "
    "Tell me a story about a cat, a dog and a bird who lived near the sea. One two three four five six seven."
)


def tiny_chat_tokenizer(vocab_size: int = 400) -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE trained on a short text) with ``CHAT_TEMPLATE``."""
    import tokenizers
    import transformers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_TEXT] * 4, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
