"""Which transformers architectures have a GGUF mapping here, and how their tensors and settings are named.

Supported (the ones qlorakit loads whose GGUF layout is a renaming plus, for llama, a row permutation):

| transformers ``model_type`` | GGUF ``general.architecture`` | q/k rows permuted |
|---|---|---|
| ``llama`` (SmolLM2, Llama 2/3) | ``llama`` | yes |
| ``mistral`` | ``llama`` (as llama.cpp's converter writes it) | yes |
| ``qwen2`` | ``qwen2`` | no (NeoX rotary) |

Names go through ``gguf.get_tensor_name_map`` (``model.layers.3.self_attn.q_proj.weight`` ->
``blk.3.attn_q.weight``). llama.cpp's llama graph applies rotary embedding to interleaved pairs
``(x[2i], x[2i+1])`` where transformers rotates halves ``(x[i], x[i + d/2])``; its converter therefore
permutes the output rows of ``q_proj`` and ``k_proj`` per head:

    W.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

(``n_head`` is the KV head count for ``k_proj``), the inverse of transformers' GGUF reader. A LoRA ``B``
(out, r) of those layers gets the same row permutation, ``A`` none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qlorakit.errors import ConfigError


@dataclass(frozen=True)
class GgufArch:
    """The GGUF side of one transformers architecture."""

    model_type: str
    gguf_name: str  # general.architecture
    permute_qk: bool


#: transformers ``model_type`` -> its GGUF architecture.
ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", "llama", True),
    "mistral": GgufArch("mistral", "llama", True),
    "qwen2": GgufArch("qwen2", "qwen2", False),
}


def arch_of(config: Any) -> GgufArch:
    """The mapping of ``config.model_type``, or a ``ConfigError`` naming it and the supported ones."""
    return arch_named(getattr(config, "model_type", None))


def arch_named(model_type: str | None) -> GgufArch:
    """The mapping of a transformers ``model_type`` (see ``arch_of``)."""
    if model_type not in ARCHS:
        raise ConfigError(
            f"architecture {model_type!r} has no GGUF mapping in qlorakit; supported: {', '.join(ARCHS)} "
            f"(export a Hugging Face checkpoint with `qlorakit merge` and convert it with llama.cpp's "
            f"convert_hf_to_gguf.py instead)"
        )
    return ARCHS[model_type]


class TensorNames:
    """Hugging Face tensor names -> GGUF names for one model, with the q/k permutation it needs."""

    def __init__(self, config: Any) -> None:
        import gguf

        self.arch = arch_of(config)
        self.config = config
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch.gguf_name)
        self._map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name of ``hf_name``; ``ConfigError`` for a tensor the GGUF layout has no place for."""
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"tensor {hf_name!r} has no GGUF name for architecture {self.arch.gguf_name!r}")
        return name

    def row_heads(self, gguf_name: str) -> int | None:
        """The head count whose rows llama.cpp expects permuted for ``gguf_name`` (``None``: no permutation)."""
        if not self.arch.permute_qk:
            return None
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return self.config.num_attention_heads
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        return None


def tied_head(model: Any) -> Any:
    """The output head when it shares its weight with the input embedding (GGUF then has no ``output.weight``)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    if getattr(head, "active_adapter", None) is not None:
        raise ConfigError("the adapter adapts lm_head, which this model ties to the input embedding; GGUF has no "
                          "separate output tensor to hold it: train the adapter without lm_head")
    return head


def permute_rows(values: np.ndarray, n_head: int | None) -> np.ndarray:
    """llama.cpp's q/k row order (module docstring): values (out, ...) -> (out, ...); ``None``: unchanged."""
    if n_head is None:
        return values
    out = values.shape[0]
    return values.reshape(n_head, 2, out // n_head // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _check_rope_scaling(config: Any) -> dict | None:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "linear":
        raise ConfigError(
            f"rope scaling {kind!r} of this checkpoint is not written by qlorakit's GGUF export (only none and "
            f"'linear'); export a Hugging Face checkpoint with `qlorakit merge` and convert it with llama.cpp"
        )
    return params


def write_hyperparameters(writer: Any, config: Any) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for a llama / mistral / qwen2 model built from ``config``."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = _check_rope_scaling(config)
    if scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
