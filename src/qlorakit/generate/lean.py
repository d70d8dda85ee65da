"""A lean forward for decoding Llama-family models (llama, mistral, qwen2): same math, less Python.

``model(input_ids, past_key_values=DynamicCache(...))`` walks a few dozen Python-level modules, helpers
and cache objects per decoder layer (mask building, attention-interface lookup, ``torch.cat`` cache
growth, output dataclasses). For a 135M model on one CPU core that bookkeeping costs about as much as
the arithmetic of a decoding step. ``LeanDecoder`` computes the same function from the same modules'
weights with only the tensor operations. For layer ``l``, new tokens at positions ``p .. p+t-1``,
hidden state ``h (1, t, d)``:

    a = RMSNorm_l(h)                                 (the layer's own norm, or F.rms_norm when equal)
    q = rope(a Wq^T), k = rope(a Wk^T), v = a Wv^T                (heads split; cos/sin of p..p+t-1)
    K_l[:, :, p:p+t] = k,  V_l[:, :, p:p+t] = v                    (caches preallocated to max_len)
    o = softmax(q K_l[:p+t]^T * head_dim^-1/2 + causal) V_l[:p+t]  (SDPA; grouped heads share K/V)
    h = h + o Wo^T
    m = RMSNorm'_l(h)
    h = h + (act(m Wgate^T) * (m Wup^T)) Wdown^T
    logits = RMSNorm_f(h[:, -1]) W_head^T

with ``rope(x) = x cos + rotate_half(x) sin`` (cos/sin from the model's own rotary module, so every
RoPE scaling variant it implements carries over). Each projection is the layer's own bound projection,
taken once (``_bind``): ``Linear4bit.bind()`` (its forward, with the compiled kernel's arguments
marshalled once for the few-row GEMV), ``quant.linear.bind_linear`` for an ``nn.Linear`` (a one-row head
takes the compiled dense GEMV), ``LoraLinear.bind()`` for an adapted one (its base's plus the adapter
update of its forward, ``LoraLinear.add_delta``, with the active adapter read at every call, so switching
adapters between requests works). No math of a projection is repeated here. Inference only: no gradient.

The reference is transformers' own forward with a ``DynamicCache`` (``decode.generate_ids`` with
``lean=False``); tests hold the logits of every step to it. Models it does not cover (another
architecture, a sliding window shorter than the request, tensor-parallel layouts) use the reference:
``unsupported_reason`` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.constants import RMSNORMS
from qlorakit.lora.layer import LoraLinear
from qlorakit.quant.linear import Projection, bind_linear

#: ``config.model_type`` values whose decoder layers have exactly the structure above.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: Any, max_len: int) -> str | None:
    """Why ``LeanDecoder`` cannot run ``model`` for ``max_len`` positions, or ``None`` if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) and window is not None
    if uses_window and max_len > window:
        return f"{max_len} positions exceed the sliding window of {window}"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no model.model.{embed_tokens, layers, norm, rotary_emb}"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "a decoder layer without self_attn.{q,k,v,o}_proj"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "a decoder layer without mlp.{gate,up,down}_proj"
    return None


def _bind(module: nn.Module) -> Projection:
    """A projection's own bound call, ``(rows, in) -> (rows, out)``: ``LoraLinear.bind()``, else ``bind_linear``."""
    return module.bind() if isinstance(module, LoraLinear) else bind_linear(module)


def _bind_norm(module: nn.Module) -> Projection:
    """A Llama-style RMSNorm module, or ``F.rms_norm`` with its weight for fp32 inputs when that is the same.

    ``w * (x * rsqrt(mean(x^2) + eps))`` with an fp32 weight and fp32 input is what ``F.rms_norm`` computes in
    one kernel; any other case (16-bit input, forward hooks, another norm class) calls the module.
    """
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    plain = type(module).__name__ in RMSNORMS
    if not plain or weight is None or eps is None or module._forward_hooks or module._forward_pre_hooks:
        return module
    if weight.dtype != torch.float32:
        return module
    shape = (weight.shape[-1],)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, shape, weight, eps) if x.dtype == torch.float32 else module(x)

    return norm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    """One decoder layer's bound projections and norms, and (for ``LeanDecoder``) its KV cache.

    ``bind`` turns each projection module into its bound call (``_bind`` by default; the batched decoder,
    ``generate.batched``, passes one that adds each row's own adapter). ``__call__`` runs the positions of one
    sequence; ``step_rows`` one new position of each of several sequences, each with its own cache, composing
    the same pieces (``_rope``, ``_attend``, ``_mlp``).
    """

    def __init__(self, layer: nn.Module, config: Any, max_len: int, dtype: torch.dtype, device: torch.device,
                 bind: Callable[[nn.Module], Projection] = _bind) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (bind(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.gate, self.up, self.down = (bind(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        self.act = mlp.act_fn
        self.norm1, self.norm2 = _bind_norm(layer.input_layernorm), _bind_norm(layer.post_attention_layernorm)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.keys, self.values = self.new_cache(max_len, dtype, device)

    def new_cache(self, max_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty keys and values for ``max_len`` positions: two (1, kv_heads, max_len, head_dim) tensors."""
        shape = (1, self.kv_heads, max_len, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def _qkv(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """a (t, d) normed rows, cos/sin (t, 1, hd) -> rope'd q (t, H, hd), k (t, KV, hd) and v (t, KV, hd)."""
        t = a.shape[0]
        q = self.q(a).view(t, self.heads, self.head_dim)
        k = self.k(a).view(t, self.kv_heads, self.head_dim)
        v = self.v(a).view(t, self.kv_heads, self.head_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One sequence's new positions start..start+t-1: q (t, H, hd), k/v (t, KV, hd) -> o (t, H * hd)."""
        t, end = q.shape[0], start + q.shape[0]
        keys, values = cache  # (1, KV, max_len, hd)
        keys[0, :, start:end] = k.transpose(0, 1)
        values[0, :, start:end] = v.transpose(0, 1)
        mask, causal = None, False
        if t > 1 and start == 0:
            causal = True
        elif t > 1:  # new rows i see cached positions j <= start + i
            mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=start)  # (t, end)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys[:, :, :end], values[:, :, :end],
                                           attn_mask=mask, is_causal=causal, scale=self.scaling,
                                           enable_gqa=self.kv_heads != self.heads)  # (1, H, t, hd)
        return o[0].transpose(0, 1).reshape(t, -1)

    def _mlp(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """h (t, d) residual, o (t, H * hd) attention output -> the layer's output (t, d)."""
        h = h + self.o(o)
        m = self.norm2(h)  # (t, d)
        return h + self.down(self.act(self.gate(m)) * self.up(m))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                 cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """h (1, t, d) at positions start..start+t-1, cos/sin (1, t, hd) -> (1, t, d), through ``cache`` (keys,
        values; default: this layer's own)."""
        h = h[0]  # (t, d)
        q, k, v = self._qkv(self.norm1(h), cos[0].unsqueeze(1), sin[0].unsqueeze(1))
        cache = (self.keys, self.values) if cache is None else cache
        return self._mlp(h, self._attend(q, k, v, start, cache)).unsqueeze(0)

    def step_rows(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, starts: list[int],
                  caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One new position per sequence: h (N, d), cos/sin (N, hd), row i at ``starts[i]`` in ``caches[i]``.

        The projections, norms and MLP take all N rows at once; attention runs per row over that row's own
        cache (no padding, no mask), so each row sees exactly what ``__call__`` would show it alone.
        """
        q, k, v = self._qkv(self.norm1(h), cos.unsqueeze(1), sin.unsqueeze(1))  # (N, H, hd), (N, KV, hd) x 2
        o = torch.cat([self._attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], starts[i], caches[i])
                       for i in range(h.shape[0])])  # (N, H * hd)
        return self._mlp(h, o)


class LeanDecoder:
    """Prefill and per-token steps of a supported model with a preallocated KV cache of ``max_len``.

    ``bind`` makes each projection's bound call (default ``_bind``; ``generate.batched`` passes its per-row
    adapter binding); ``forward`` runs positions of one sequence through any cache, ``step`` through its own.
    """

    def __init__(self, model: Any, max_len: int, bind: Callable[[nn.Module], Projection] = _bind) -> None:
        reason = unsupported_reason(model, max_len)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, _bind_norm(inner.norm), inner.rotary_emb
        self.head = _bind(model.get_output_embeddings())
        self.max_len = max_len
        weight = self.embed.weight
        self.layers = [_Layer(layer, model.config, max_len, weight.dtype, weight.device, bind)
                       for layer in inner.layers[: model.config.num_hidden_layers]]
        self.length = 0  # positions already in the cache

    def forward(self, ids: torch.Tensor, start: int, caches: list | None = None) -> torch.Tensor:
        """``ids (1, t)`` at positions start..start+t-1 through ``caches`` (one (keys, values) per layer; default:
        the layers' own) -> the logits of the last position, ``(vocab,)``."""
        t = ids.shape[1]
        h = self.embed(ids)  # (1, t, d)
        positions = torch.arange(start, start + t, device=ids.device).unsqueeze(0)  # (1, t)
        cos, sin = self.rotary(h, positions)  # (1, t, hd) each
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, start, None if caches is None else caches[index])
        last = self.norm(h[:, -1:])[0]  # (1, d)
        return self.head(last)[0]  # (vocab,)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids (1, t)`` at the next ``t`` positions; return the logits of the last one, ``(vocab,)``."""
        t = ids.shape[1]
        start = self.length
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions exceed the decoder's max_len of {self.max_len}")
        logits = self.forward(ids, start)
        self.length = start + t
        return logits
