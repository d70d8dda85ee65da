"""From a source's config to an empty model skeleton with 4-bit shells in place of the target linears.

``load_config`` reads a directory's ``config.json`` (a GGUF's config comes from ``models.gguf``),
``build_empty_model`` instantiates the transformers causal-LM class on the meta device, and
``patch_targets`` swaps each ``all-linear`` target (the q/k/v/o/gate/up/down projections of the decoder
blocks, never ``lm_head``) for a ``Linear4bit`` shell that holds no weight yet. Nothing here reads a
tensor of the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.constants import NORM_OUTPUT_IN_INPUT_DTYPE
from qlorakit.errors import ModelLoadError
from qlorakit.models.meta import init_empty_weights
from qlorakit.models.source import ModelSource
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.tensor import QuantizedTensor

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The ``PretrainedConfig`` of a directory source; an unknown ``model_type`` fails with the fix."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    raw = source.config_json()
    model_type = raw.get("model_type")
    remote = trust_remote_code and "auto_map" in raw
    if not remote and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{source.path}/config.json has model_type {model_type!r}, which transformers {transformers.__version__} "
            f"does not know; upgrade transformers, or pass trust_remote_code=True if the model ships its own code"
        )
    try:
        return AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{source.path}/config.json cannot be read by transformers: {exc}") from exc


def build_empty_model(config: Any, compute_dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The ``AutoModelForCausalLM`` class of ``config`` with every parameter on the meta device."""
    from transformers import AutoModelForCausalLM

    if compute_dtype not in COMPUTE_DTYPES:
        raise ModelLoadError(f"compute_dtype {compute_dtype} is not supported; use one of {COMPUTE_DTYPES}")
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ModelLoadError(
            f"transformers has no causal-LM class for model_type {getattr(config, 'model_type', None)!r} ({exc})"
        ) from exc
    return model


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters of normalization layers (class name containing ``Norm``): they are kept in fp32."""
    names = set()
    for path, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            names |= {f"{path}.{leaf}" if path else leaf for leaf, _ in module.named_parameters(recurse=False)}
    return names


def output_in_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    """A forward hook: ``output`` cast to the dtype of the module's first input."""
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


def keep_norm_outputs_in_input_dtype(model: nn.Module) -> int:
    """Hook every normalization module so it returns its input's dtype; returns how many were hooked.

    A norm with an fp32 weight turns a bf16 residual stream into fp32 (``weight * x`` promotes), and the
    next 16-bit layer (``lm_head``) then refuses the input. The norm still computes with its fp32 weight.
    """
    hooked = 0
    for module in model.modules():
        if "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False)):
            module.register_forward_hook(output_in_input_dtype)
            setattr(module, NORM_OUTPUT_IN_INPUT_DTYPE, True)  # the fused 16-bit RMSNorm returns that dtype too
            hooked += 1
    return hooked


def empty_qweight(out_features: int, in_features: int, quant: QuantConfig, device: torch.device) -> QuantizedTensor:
    """A placeholder ``QuantizedTensor`` with no storage (``packed.numel() == 0``): "not loaded yet"."""
    empty_u8, empty_f32 = torch.empty((0, 1), dtype=torch.uint8, device=device), torch.empty(0, device=device)
    return QuantizedTensor(
        packed=empty_u8, absmax=empty_f32, code=empty_f32, quant_type=quant.quant_type, blocksize=quant.blocksize,
        shape=(out_features, in_features), dtype=torch.float32,
    )  # fmt: skip


def is_pending(module: Linear4bit) -> bool:
    """Whether a shell from ``linear4bit_shell`` has not received its weight yet (a layer that holds its weight
    otherwise, e.g. as one rank's rows of it, has no ``qweight`` attribute of its own)."""
    qweight = vars(module).get("qweight")
    return qweight is not None and qweight.packed.numel() == 0


def linear4bit_shell(
    linear: nn.Linear, quant: QuantConfig, compute_dtype: torch.dtype, device: torch.device
) -> Linear4bit:
    """A ``Linear4bit`` shaped like ``linear`` holding no weight (its bias, if any, stays on meta)."""
    module = Linear4bit.empty(linear.in_features, linear.out_features, quant.quant_type, quant.blocksize,
                              quant.double_quant, compute_dtype)
    module.qweight = empty_qweight(linear.out_features, linear.in_features, quant, device)
    module.bias = None
    if linear.bias is not None:
        module.bias = nn.Parameter(
            torch.empty(linear.out_features, dtype=compute_dtype, device="meta"), requires_grad=False
        )
    return module


def patch_targets(
    model: nn.Module, targets: list[str], quant: QuantConfig, compute_dtype: torch.dtype, device: torch.device
) -> None:
    """Replace each target ``nn.Linear`` of ``model`` by a ``Linear4bit`` shell."""
    for path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ModelLoadError(f"target {path} is a {type(linear).__name__}, not an nn.Linear; cannot quantize it")
        setattr(parent, child, linear4bit_shell(linear, quant, compute_dtype, device))
