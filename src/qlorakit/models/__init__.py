"""Load Hugging Face causal language models with their decoder linears in 4 bits.

``load_model(source, quant=QuantConfig(), lora=None)`` accepts a local Hugging Face directory
(safetensors, single or sharded), a directory saved by transformers + bitsandbytes in 4 bits, a
``.gguf`` file, a built-in alias such as ``smollm2-135m-instruct``, or a Hub id; ``load_tokenizer``
gives the matching tokenizer, ``quantize_model`` quantizes a model already in memory, and ``inspect_source``
describes a model from its config alone.
"""

from qlorakit.models.inspect import ModelSummary, inspect_source
from qlorakit.models.loader import load_model, load_tokenizer
from qlorakit.models.quantize import quantize_model
from qlorakit.models.registry import REGISTRY, RegistryEntry, cache_dir, seed_cache
from qlorakit.models.source import ModelSource, resolve_source

__all__ = [
    "REGISTRY",
    "ModelSource",
    "ModelSummary",
    "RegistryEntry",
    "cache_dir",
    "inspect_source",
    "load_model",
    "load_tokenizer",
    "quantize_model",
    "resolve_source",
    "seed_cache",
]
