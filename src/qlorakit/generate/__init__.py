"""Text generation and chat with a 4-bit base model and any number of named LoRA adapters.

``generate_text`` runs the KV-cached decoding loop (``decode``) with greedy or temperature/top-p sampling
(``sampling``) and streams the text; ``load_adapters``/``use_adapter`` put several PEFT adapters on one
base and pick one per request (``adapters``); ``ChatSession`` keeps a conversation in the tokenizer's
chat template (``chat``).
"""

from qlorakit.generate.adapters import (
    BASE_ONLY,
    AdapterSpec,
    load_adapters,
    use_adapter,
)
from qlorakit.generate.chat import ChatSession, chat_prompt_ids
from qlorakit.generate.decode import (
    Generation,
    TextStream,
    generate_ids,
    generate_text,
    stop_token_ids,
)
from qlorakit.generate.sampling import SamplingConfig, next_token, top_p_filter

__all__ = [
    "BASE_ONLY",
    "AdapterSpec",
    "ChatSession",
    "Generation",
    "SamplingConfig",
    "TextStream",
    "chat_prompt_ids",
    "generate_ids",
    "generate_text",
    "load_adapters",
    "next_token",
    "stop_token_ids",
    "top_p_filter",
    "use_adapter",
]
