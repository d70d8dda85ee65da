"""``Linear4bit``: a frozen linear layer whose weight is a ``QuantizedTensor``.

Forward (QLoRA eq. 5, without the adapter): ``y = x @ dequant(W).T + b`` in the compute dtype.
At most ``FEW_ROWS`` input rows that need no gradient (batch-1 decoding, a short prefill) go through
``gemv_4bit`` instead, which never builds the full weight; ``use_gemv = False`` on a layer forces the reference path.
Backward: only the input gradient ``dL/dx = dL/dy @ dequant(W)`` is produced — the base weight is frozen —
and the autograd function saves nothing but a reference to the packed ``QuantizedTensor``: the
dequantized weight is rebuilt in backward instead of being kept alive between the passes.
On CUDA with Triton installed both passes (and the one-row GEMV) go to ``qlorakit.quant.backends``,
whose kernels decode ``W`` tile by tile and never write it out.

The state dict uses bitsandbytes' keys exactly: ``<prefix>weight`` (packed uint8) plus
``<prefix>weight.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
``.quant_state.bitsandbytes__<type>`` (see ``QuantizedTensor.to_bnb_dict``), and ``<prefix>bias``.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from qlorakit.errors import QuantizationError, StateDictError
from qlorakit.quant import backends
from qlorakit.quant.functional import FLOAT_DTYPES, dequantize_4bit, quantize_4bit
from qlorakit.quant.gemv import FEW_ROWS, gemv_4bit
from qlorakit.quant.tensor import QuantizedTensor


class _Scratch(threading.local):
    """Per thread: one flat buffer per (dtype, device), grown to the largest weight dequantized so far."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


_scratch = _Scratch()


def dequantize_scratch(qweight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_4bit(qweight, dtype)`` written into this thread's reusable CPU buffer: (out, in).

    Valid until the next call on this thread: only for a weight consumed at once (``_Matmul4bit`` uses
    it for one matmul and keeps nothing). A fresh (out, in) tensor per layer and pass is fresh pages
    under the trainer's fixed mmap threshold (``train.allocator``): 0.76 GiB of page faults per step for
    SmolLM2 at 2 x 512 tokens. The buffer holds as much as the largest weight, as the fresh tensor did.
    ``Linear4bit.reuse_dequant_buffer = False`` (a class switch) or a non-CPU weight: a new tensor each time.
    """
    key, numel = (dtype, qweight.device), qweight.numel
    buffer = _scratch.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffers[key] = torch.empty(numel, dtype=dtype, device=qweight.device)
    return dequantize_4bit(qweight, dtype=dtype, out=buffer[:numel].view(qweight.shape))


def _dequantize_for_matmul(qweight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    if Linear4bit.reuse_dequant_buffer and qweight.device.type == "cpu":
        return dequantize_scratch(qweight, dtype)
    return dequantize_4bit(qweight, dtype=dtype)


class _Matmul4bit(torch.autograd.Function):
    """``x @ dequant(W).T`` with an input-only backward; ``W`` is captured by reference, not saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:  # x: (..., in)
        ctx.qweight = qweight
        fast = backends.select(x.device)  # Triton kernels for CUDA tensors; None on CPU
        if fast is not None and fast.is_supported(qweight, x):
            return fast.matmul_4bit(x, qweight)  # (..., out), W decoded tile by tile, never stored
        weight = _dequantize_for_matmul(qweight, x.dtype)  # (out, in)
        return x @ weight.t()  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out: (..., out)
        if not ctx.needs_input_grad[0]:
            return None, None
        fast = backends.select(grad_out.device)
        if fast is not None and fast.is_supported(ctx.qweight, grad_out):
            return fast.grad_input_4bit(grad_out, ctx.qweight), None  # (..., in)
        weight = _dequantize_for_matmul(ctx.qweight, grad_out.dtype)  # (out, in)
        return grad_out @ weight, None  # (..., in)


def matmul_4bit(x: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:
    """``x (..., in) @ dequant(qweight).T -> (..., out)``: the reference 4-bit matmul."""
    return _Matmul4bit.apply(x, qweight)


class Linear4bit(nn.Module):
    """A linear layer with a frozen 4-bit weight (and an optional bias, frozen by default)."""

    #: Route up to FEW_ROWS input rows without grad through ``gemv_4bit`` (set ``False`` on a layer for the reference).
    use_gemv: bool = True
    #: Dequantize into a reused per-thread buffer for the CPU matmul (``dequantize_scratch``); ``False``: a new tensor.
    reuse_dequant_buffer: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise QuantizationError(f"compute_dtype {compute_dtype} not supported; use one of {FLOAT_DTYPES}")
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        # The weight starts as an all-zero quantized tensor of the right shape; from_linear or
        # load_state_dict fills it.
        zeros = torch.zeros(out_features, in_features, device=device)
        self.qweight: QuantizedTensor = quantize_4bit(zeros, quant_type, blocksize, double_quant)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        name: str = "weight",
    ) -> Linear4bit:
        """Quantize an ``nn.Linear``; its bias is copied unchanged (frozen). ``name`` labels errors."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.quant_type, module.blocksize, module.double_quant = quant_type, blocksize, double_quant
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise QuantizationError(f"compute_dtype {compute_dtype} not supported; use one of {FLOAT_DTYPES}")
        module.compute_dtype = compute_dtype
        module.qweight = quantize_4bit(linear.weight.data, quant_type, blocksize, double_quant, name=name)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The packed uint8 codes (what bitsandbytes stores under ``weight``)."""
        return self.qweight.packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight (out, in), in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.qweight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if x.shape[-1] != self.in_features:
            raise QuantizationError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        few_rows = x.numel() <= FEW_ROWS * self.in_features and not (x.requires_grad and torch.is_grad_enabled())
        if few_rows and self.use_gemv and len(self.qweight.shape) == 2 and backends.select(x.device) is None:
            out = gemv_4bit(x, self.qweight)  # (..., out), the weight never materialized
        else:
            out = matmul_4bit(x, self.qweight)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(input_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.qweight.quant_type}, blocksize={self.qweight.blocksize}, "
            f"double_quant={self.qweight.double_quant}"
        )

    # --- device moves and serialization --------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        # Device moves reach the quantized state; dtype casts (model.half()) must not touch it. Module
        # casts only convert floating tensors, so the uint8 codes tell where ``fn`` sends this layer.
        device = fn(self.qweight.packed).device
        if device != self.qweight.device:
            self.qweight = self.qweight.to(device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.qweight.packed
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        for key, value in self.qweight.to_bnb_dict().items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight_key = prefix + "weight"
        own = {k[len(weight_key) + 1 :]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        bias_only = {k: v for k, v in state_dict.items() if k == prefix + "bias"}
        super()._load_from_state_dict(bias_only, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            return
        layer = prefix.rstrip(".") or "Linear4bit"
        qweight = QuantizedTensor.from_bnb_dict(state_dict[weight_key], own, where=layer + ".weight")
        if tuple(qweight.shape) != (self.out_features, self.in_features):
            raise StateDictError(
                f"{layer}.weight: quant_state shape {list(qweight.shape)} does not match this layer "
                f"(out_features={self.out_features}, in_features={self.in_features})"
            )
        self.qweight = qweight.to(self.qweight.device)
        self.quant_type, self.blocksize, self.double_quant = qweight.quant_type, qweight.blocksize, qweight.double_quant
