"""Memory planner: what QLoRA training of a model needs, part by part, before anything is loaded.

- ``model_shape``: read a model's shape from its config (or a LLaMA-1 ``<N>b`` shape of the paper);
- ``PlanSettings`` / ``plan``: the breakdown (``MemoryPlan``) as arithmetic, see ``planner.estimate``;
- ``format_plan`` / ``parse_size``: the table ``qlorakit plan`` prints, and ``48GB``-style sizes.
"""

from qlorakit.planner.estimate import MemoryPlan, Part, PlanSettings, plan
from qlorakit.planner.format import format_plan, parse_size
from qlorakit.planner.shapes import LLAMA1_SHAPES, ModelShape, model_shape

__all__ = [
    "LLAMA1_SHAPES",
    "MemoryPlan",
    "ModelShape",
    "Part",
    "PlanSettings",
    "format_plan",
    "model_shape",
    "parse_size",
    "plan",
]
