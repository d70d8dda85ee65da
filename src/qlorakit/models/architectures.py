"""transformers class names whose forward qlorakit's fast paths know exactly (one home for these lists).

- ``RMSNORMS``: norms computing ``weight * (x * rsqrt(mean(x^2, -1) + eps))`` with ``variance_epsilon``
  (``train.rmsnorm`` fuses them for training, ``generate.lean`` calls ``F.rms_norm`` for them);
- ``SWIGLU_MLPS``: MLPs computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (``train.recompute``).
"""

from __future__ import annotations

RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
