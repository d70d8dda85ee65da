"""``Linear4bit``: a frozen linear layer whose weight is a ``QuantizedTensor``.

Forward (QLoRA eq. 5, without the adapter): ``y = x @ dequant(W).T + b`` in the compute dtype.
At most ``FEW_ROWS`` input rows that need no gradient (batch-1 decoding, a short prefill) go through
``gemv_4bit`` instead, which never builds the full weight; ``use_gemv = False`` on a layer forces the reference path.
``Linear4bit.bind()`` hands out the same forward for decoding with the compiled kernel's arguments marshalled
once, and ``bind_linear`` the bound projection of any base linear (``generate.lean`` and ``LoraLinear.bind``
compose them), so the GEMV branch has one copy.
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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.errors import QuantizationError, StateDictError
from qlorakit.quant import backends
from qlorakit.quant.functional import FLOAT_DTYPES, dequantize_4bit, quantize_4bit
from qlorakit.quant.gemv import FEW_ROWS, gemv_4bit
from qlorakit.quant.tensor import QuantizedTensor

Projection = Callable[[torch.Tensor], torch.Tensor]  # a bound linear: x (rows, in) -> (rows, out)


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
    ``reuse_dequant_buffer = False`` on a ``Linear4bit`` or a non-CPU weight: a new tensor each time.
    """
    key, numel = (dtype, qweight.device), qweight.numel
    buffer = _scratch.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffers[key] = torch.empty(numel, dtype=dtype, device=qweight.device)
    return dequantize_4bit(qweight, dtype=dtype, out=buffer[:numel].view(qweight.shape))


def _dequantize_for_matmul(qweight: QuantizedTensor, dtype: torch.dtype, reuse_buffer: bool) -> torch.Tensor:
    if reuse_buffer and qweight.device.type == "cpu":
        return dequantize_scratch(qweight, dtype)
    return dequantize_4bit(qweight, dtype=dtype)


class _Matmul4bit(torch.autograd.Function):
    """``x @ dequant(W).T`` with an input-only backward; ``W`` is captured by reference, not saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedTensor, reuse_buffer: bool) -> torch.Tensor:  # x: (..., in)
        ctx.qweight, ctx.reuse_buffer = qweight, reuse_buffer
        fast = backends.select(x.device)  # Triton kernels for CUDA tensors; None on CPU
        if fast is not None and fast.is_supported(qweight, x):
            return fast.matmul_4bit(x, qweight)  # (..., out), W decoded tile by tile, never stored
        weight = _dequantize_for_matmul(qweight, x.dtype, reuse_buffer)  # (out, in)
        return x @ weight.t()  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out: (..., out)
        if not ctx.needs_input_grad[0]:
            return None, None, None
        fast = backends.select(grad_out.device)
        if fast is not None and fast.is_supported(ctx.qweight, grad_out):
            return fast.grad_input_4bit(grad_out, ctx.qweight), None, None  # (..., in)
        weight = _dequantize_for_matmul(ctx.qweight, grad_out.dtype, ctx.reuse_buffer)  # (out, in)
        return grad_out @ weight, None, None  # (..., in)


def matmul_4bit(x: torch.Tensor, qweight: QuantizedTensor, reuse_buffer: bool = True) -> torch.Tensor:
    """``x (..., in) @ dequant(qweight).T -> (..., out)``: the reference 4-bit matmul.

    ``reuse_buffer``: on the CPU, dequantize into this thread's reused buffer (``dequantize_scratch``) in both
    passes; ``False``: a new tensor each time.
    """
    return _Matmul4bit.apply(x, qweight, reuse_buffer)


class Linear4bit(nn.Module):
    """A linear layer with a frozen 4-bit weight (and an optional bias, frozen by default).

    Per-layer settings (set in the constructors; ``True`` by default):
    ``use_gemv``: send up to ``FEW_ROWS`` input rows without grad to ``gemv_4bit`` (``False``: the reference);
    ``reuse_dequant_buffer``: the CPU matmul dequantizes into a reused per-thread buffer (``dequantize_scratch``;
    ``False``: a new tensor each time).
    """

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
        self._set_fields(in_features, out_features, quant_type, blocksize, double_quant, compute_dtype)
        # The weight starts as an all-zero quantized tensor of the right shape; from_linear or
        # load_state_dict fills it.
        zeros = torch.zeros(out_features, in_features, device=device)
        self.qweight: QuantizedTensor = quantize_4bit(zeros, quant_type, blocksize, double_quant)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def _set_fields(self, in_features: int, out_features: int, quant_type: str, blocksize: int, double_quant: bool,
                    compute_dtype: torch.dtype | None) -> None:  # fmt: skip
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise QuantizationError(f"compute_dtype {compute_dtype} not supported; use one of {FLOAT_DTYPES}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.use_gemv = True
        self.reuse_dequant_buffer = True

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """A layer with its settings but no weight: the caller sets ``qweight`` and ``bias`` (``from_linear``,
        ``models.build``'s shells)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_fields(in_features, out_features, quant_type, blocksize, double_quant, compute_dtype)
        return module

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
        module = cls.empty(linear.in_features, linear.out_features, quant_type, blocksize, double_quant, compute_dtype)
        module.qweight = quantize_4bit(linear.weight.data, quant_type, blocksize, double_quant, name=name)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return module

    @property
    def device(self) -> torch.device:
        """Where the 4-bit state lives (a sharded layer answers without gathering its rows)."""
        return self.qweight.device

    @property
    def weight(self) -> torch.Tensor:
        """The packed uint8 codes (what bitsandbytes stores under ``weight``)."""
        return self.qweight.packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight (out, in), in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.qweight, dtype)

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if x.shape[-1] != self.in_features:
            raise QuantizationError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        return self._project(x, self._gemv if self._takes_gemv(x) else self._matmul)  # (..., out)

    def _takes_gemv(self, x: torch.Tensor) -> bool:
        """Whether forward sends ``x`` to the GEMV: ``_few_rows``, a 2-D weight, and no fast backend for
        ``x``'s device (that one has its own one-row path)."""
        return self._few_rows(x) and len(self.qweight.shape) == 2 and backends.select(x.device) is None

    def _few_rows(self, x: torch.Tensor) -> bool:
        """``use_gemv`` on and at most ``FEW_ROWS`` rows of ``x`` that need no gradient."""
        few = x.numel() <= FEW_ROWS * self.in_features and not (x.requires_grad and torch.is_grad_enabled())
        return few and self.use_gemv

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) in the compute dtype
        return gemv_4bit(x, self.qweight)  # (..., out), the weight never materialized

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) in the compute dtype
        return matmul_4bit(x, self.qweight, self.reuse_dequant_buffer)  # (..., out)

    def _project(self, x: torch.Tensor, product: Projection) -> torch.Tensor:  # x: (..., in)
        """``product(x) + b``: ``x`` cast to the compute dtype, the result cast back to ``x``'s dtype."""
        input_dtype, compute = x.dtype, self.compute_dtype
        if compute is not None and compute != input_dtype:  # (.to of the same dtype: x itself, at dispatch cost)
            x = x.to(compute)
        out, bias = product(x), self.bias  # (..., out), (out,) or None
        if bias is not None:
            out = out + (bias if bias.dtype == out.dtype else bias.to(out.dtype))
        return out if out.dtype == input_dtype else out.to(input_dtype)

    def bind(self) -> Projection:
        """This forward for decoding, ``x (rows, in) -> (rows, out)``, equal to ``self(x)`` bit for bit.

        The rows forward sends to the GEMV go to the compiled kernel (``backends.native_cpu().bind_gemv``) with its
        arguments marshalled once: the same kernel ``gemv_4bit`` calls, without re-marshalling per call; any
        other input, or no kernel for this weight, calls forward. Bound to the current ``qweight``: bind again
        after a device move or ``load_state_dict``.
        """
        kernels = backends.native_cpu()  # the compiled CPU kernels, or None
        kernel = None if kernels is None else kernels.bind_gemv(self.qweight)  # a 2-D CPU weight, or None
        if kernel is None or backends.select(self.qweight.device) is not None:
            return self

        def gemv(x: torch.Tensor) -> torch.Tensor:  # x: (rows, in) in the compute dtype -> (rows, out)
            x = x.contiguous()
            if x.dtype == torch.float32:
                return kernel(x)
            if x.dtype == torch.bfloat16:
                return kernel.bf16(x)  # = kernel(x.float()).to(bf16), the casts done in C
            return kernel(x.float()).to(x.dtype)  # the kernel sums in fp32, as gemv_4bit

        def projection(x: torch.Tensor) -> torch.Tensor:  # x: (rows, in)
            if x.is_cpu and x.dim() == 2 and x.shape[1] == self.in_features and self._few_rows(x):  # = _takes_gemv
                return self._project(x, gemv)
            return self(x)

        return projection

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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key = prefix + "weight"
        own = {k[len(weight_key) + 1 :]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        bias_only = {k: v for k, v in state_dict.items() if k == prefix + "bias"}
        super()._load_from_state_dict(
            bias_only, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
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


def bind_linear(module: nn.Module) -> Projection:
    """The bound projection of a base linear for decoding, ``x (rows, in) -> (rows, out)``.

    A ``Linear4bit``: ``module.bind()``. A plain ``nn.Linear``: ``F.linear``, except one fp32/bf16 row without
    bias, which takes the compiled dense GEMV (``backends.native_cpu().dense_gemv``: it streams the weight once
    and sums in fp32, so it agrees with ``F.linear`` to fp32 rounding, not bit for bit). Anything else: the module.
    """
    if isinstance(module, Linear4bit):
        return module.bind()
    if type(module) is not nn.Linear:
        return module
    weight, bias = module.weight, module.bias  # (out, in), (out,) or None
    kernels = backends.native_cpu()  # the compiled CPU kernels, or None

    def dense(x: torch.Tensor) -> torch.Tensor:  # x: (rows, in)
        if x.shape[0] == 1 and bias is None and kernels is not None:
            y = kernels.dense_gemv(x[0].contiguous(), weight)  # (out,), or None if the kernel cannot take it
            if y is not None:
                return y.unsqueeze(0)
        return F.linear(x, weight, bias)  # (rows, out)

    return dense
