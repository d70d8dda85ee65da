"""``LoraLinear``: a LoRA adapter wrapped around a frozen linear layer (composition, not inheritance).

For the active adapter with rank ``r`` (Hu et al., 2021, eq. 3; QLoRA, Dettmers et al., 2023, eq. 5):

    y = base(x) + scale * B(A(dropout(x)))  =  x W^T + b + scale * dropout(x) A^T B^T

with ``A: (r, in_features)``, ``B: (out_features, r)`` and ``scale = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
Initialisation: ``default`` draws A Kaiming-uniform (a = sqrt 5, as ``nn.Linear``) and sets B = 0, so a
fresh adapter leaves the output unchanged; ``gaussian`` draws A ~ N(0, std = 1/r) (PEFT's convention);
``zeros`` sets both to 0 (used before loading saved weights).

The base is an ``nn.Linear`` or a ``Linear4bit`` and stays frozen. Adapter weights are fp32 parameters by
default: the input is cast to the adapter dtype and the adapter's result back to the base output's dtype.
Several adapters live side by side under their names (``lora_A[name]``, ``lora_B[name]``); at most one is
active, and ``enabled = False`` gives the base-only forward.

The adapter's part has one home, ``LoraLinear.add_delta``: ``forward`` adds it to the base output, ``bind()``
(the decoding projection ``generate.lean`` composes) to the base's bound projection (``quant.linear.bind_linear``),
and ``lora.fused`` only replaces ``lora_A[name]`` by a module that shares the ``A`` product between siblings.

With ``LoraConfig.dora`` the adapter also has a magnitude vector ``lora_magnitude_vector[name].weight``
(out,) and ``add_delta`` computes DoRA's ``b + m/||W + s B A||_row * (x W^T + s B A x)`` instead
(``lora.dora`` has the math and PEFT's dropout rule); ``merge`` then writes ``m/n * (W + s B A)``.

``merge()`` writes ``W + scale * B @ A`` (computed in fp32, stored in W's dtype) into a 16/32-bit
``nn.Linear`` base; ``unmerge()`` subtracts it again. A 4-bit base is never merged in place: re-quantizing
would silently change the base, so that is ``merge_and_export``'s job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError, QlorakitError
from qlorakit.lora.dora import DoraMagnitude, base_version, dora_output, weight_norm
from qlorakit.lora.dropout import dropped_down_product, lean_dropout
from qlorakit.quant.linear import Linear4bit, Projection, bind_linear


def down_product(h: torch.Tensor, weight_a: torch.Tensor) -> torch.Tensor:
    """``u = h A^T``: h (..., in), A (r, in) -> (..., r), what an adapter's ``lora_A`` (a bias-free ``nn.Linear``)
    computes; ``lora.fused`` calls it once with the stacked ``[A_1; ...; A_k]`` of sibling layers."""
    return F.linear(h, weight_a)


def dropped_down(h: torch.Tensor, weight_a: torch.Tensor, dropout: nn.Module | None) -> torch.Tensor:
    """``u = dropout(h) A^T`` with ``h`` cast to A's dtype: h (..., in), A (r, in) -> (..., r). A training
    ``nn.Dropout`` goes through ``lora.dropout.dropped_down_product`` (keeps ``h`` as given, uncast, and its mask
    packed to bits, not the dropped copy and a float mask); any other dropout module (``None``/``nn.Identity``: none) is
    applied to the cast input before ``down_product``."""
    p = lean_dropout(dropout)
    if p is not None:
        return dropped_down_product(h, weight_a, p)
    h = h if h.dtype == weight_a.dtype else h.to(weight_a.dtype)  # (..., in)
    return down_product(h if dropout is None or type(dropout) is nn.Identity else dropout(h), weight_a)


def _addmm_fusable(result: torch.Tensor, u: torch.Tensor, lora_b: nn.Module) -> bool:
    """The adapter output can be added by ``addmm``: a plain bias-free ``B`` in the dtype of ``u`` and ``result``."""
    weight = getattr(lora_b, "weight", None)
    return (type(lora_b) is nn.Linear and lora_b.bias is None and result.dim() >= 2
            and result.dtype == u.dtype == weight.dtype)  # fmt: skip


def _add_up_projection(result: torch.Tensor, u: torch.Tensor, weight_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``result + scale * u @ B^T`` as one ``addmm``: result (..., out), u (..., r), B (out, r) -> (..., out).

    The reference ``result + B(u) * scale`` writes three (..., out) tensors in forward (``u B^T``, its
    scaled copy, the sum) and one in backward (the gradient times ``scale``); ``addmm`` writes none in
    forward when ``result`` is the base layer's own 2-D output (``addmm_`` into it: nothing saved it, the
    base's backward needs only its input; an in-place op on a *view* would cost autograd two full-size
    copies in backward, hence 2-D and not a view) and one otherwise, and none of that size in
    backward (``dL/du = scale * g B`` and ``dL/dB = scale * g^T u`` are (..., r) and (out, r)). It rounds
    once where the reference rounds the product, the scaling and the sum separately, so the two agree to
    fp32 rounding, not bit for bit.
    """
    u2 = u.reshape(-1, u.shape[-1])  # (N, r)
    if result.dim() == 2 and result.is_contiguous() and result._base is None:
        return result.addmm_(u2, weight_b.t(), alpha=scale)  # (N, out), in place: no copy-slices in backward
    return torch.addmm(result.reshape(-1, result.shape[-1]), u2, weight_b.t(), alpha=scale).view(result.shape)


class MergeError(QlorakitError, ValueError):
    """An adapter that cannot be merged into its base weight (4-bit base, or a non-finite result)."""


class LoraLinear(nn.Module):
    """A frozen base linear plus named LoRA adapters; see the module docstring for the math."""

    is_lora_linear = True

    def __init__(self, base_layer: nn.Linear | Linear4bit) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise ConfigError(f"LoraLinear wraps nn.Linear or Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r): weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out): weight (out, r)
        self.lora_dropout = nn.ModuleDict()  # name -> Dropout(p) or Identity
        self.lora_magnitude_vector = nn.ModuleDict()  # name -> DoraMagnitude: weight (out,), DoRA adapters only
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # name -> (what it was computed from, (out,))
        self._merged_norm: torch.Tensor | None = None  # n of a merged DoRA adapter, for unmerge: (out,)
        self.configs: dict[str, LoraConfig] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.enabled = True
        self.merged_adapter: str | None = None
        # Fold ``scale * u B^T`` into the base output with one ``addmm`` (``_add_up_projection``) when the dtypes
        # allow; ``False`` on this layer keeps the reference ``result + B(u) * scale``.
        self.fuse_up_projection = True

    # --- adapters by name ----------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (packed uint8 codes for a 4-bit base)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _device(self) -> torch.device:
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.device
        return self.base_layer.weight.device

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype = torch.float32) -> None:
        """Add adapter ``name`` (rank ``config.r``, initialised per ``config.init``); it does not become active."""
        if name in self.lora_A:
            raise ConfigError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        if not name or "." in name:
            raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.'")
        r, device = config.r, self._device()
        lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, in)
        lora_b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        with torch.no_grad():
            if config.init == "default":
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            elif config.init == "gaussian":
                nn.init.normal_(lora_a.weight, std=1.0 / r)
            else:
                lora_a.weight.zero_()
            lora_b.weight.zero_()
        self.lora_A[name], self.lora_B[name] = lora_a, lora_b
        self._set_config(name, config)
        if config.dora:  # m = ||W + s B A||_row of the starting weights: the adapter starts as the identity
            norm = weight_norm(self.base_layer, lora_a.weight, lora_b.weight, self.scaling[name])  # (out,)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(dtype))

    def _set_config(self, name: str, config: LoraConfig) -> None:
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.configs[name], self.scaling[name] = config, config.scale

    def update_config(self, name: str, config: LoraConfig) -> None:
        """Give adapter ``name`` a new alpha / dropout / rsLoRA setting; its rank, and so its weights, stay."""
        self._check_name(name)
        if config.r != self.configs[name].r:
            raise ConfigError(f"adapter {name!r} has rank {self.configs[name].r}; a config with r={config.r} "
                              "needs a new adapter (delete it and add it again)")
        if config.dora != self.configs[name].dora:
            raise ConfigError(f"adapter {name!r} has dora={self.configs[name].dora}; a config with "
                              f"dora={config.dora} needs a new adapter (delete it and add it again)")
        self._check_unmerged(f"change the config of adapter {name!r}")
        self._set_config(name, config)

    def _check_name(self, name: str) -> None:
        if name not in self.lora_A:
            raise ConfigError(f"no adapter {name!r} on this layer; adapters: {self.adapter_names}")

    def _check_unmerged(self, action: str) -> None:
        if self.merged_adapter is not None:
            raise MergeError(f"cannot {action} while adapter {self.merged_adapter!r} is merged; call unmerge() first")

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter used in forward (``None``: base only)."""
        if name is not None:
            self._check_name(name)
        if name != self.active_adapter:
            self._check_unmerged("switch adapters")
        self.active_adapter = name

    def set_enabled(self, enabled: bool) -> None:
        """``False`` gives the base-only forward without forgetting the active adapter."""
        if enabled != self.enabled:
            self._check_unmerged("enable or disable adapters")
        self.enabled = enabled

    def delete_adapter(self, name: str) -> None:
        self._check_name(name)
        if self.merged_adapter == name:
            self._check_unmerged(f"delete adapter {name!r}")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._dora_norms.pop(name, None)
        del self.configs[name], self.scaling[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # --- forward -------------------------------------------------------------------------------------

    def _adapter_in_use(self) -> str | None:
        """The adapter forward adds: the active one, unless adapters are disabled or it is merged into the base."""
        name = self.active_adapter
        return None if not self.enabled or self.merged_adapter is not None else name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in_features)
        name = self._adapter_in_use()
        if name is None:
            return self.base_layer(x)  # (..., out_features)
        # (N, out): 2-D, so the base returns its own tensor (not a view) that addmm_ may write into
        return self.add_delta(name, x, self.base_layer(x.reshape(-1, self.in_features)))

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scale * B(A(dropout(x)))`` for adapter ``name``: x (..., in), result (N, out) -> (..., out).

        ``result`` is the base output of the ``N`` rows of ``x``; when it is the base's own 2-D tensor, the
        ``addmm`` fold (``fuse_up_projection``) writes into it. A plain ``nn.Linear`` A or B is applied by
        its functional form (``down_product``, ``F.linear``: its forward without the few microseconds of a
        module call, which decoding pays per projection); ``lora.fused.SharedInputA`` hands out its slice of
        a product shared with sibling layers: it is handed ``x`` itself and this layer's dropout, and casts
        and drops the shared input once for the whole group (one mask; see ``lora.fused``).
        """
        if name in self.lora_magnitude_vector:
            return self._add_dora_delta(name, x, result)
        lora_a, lora_b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        if type(lora_a) is nn.Linear:
            u = dropped_down(x, lora_a.weight, dropout)  # (..., r): x cast to the adapter dtype there
        else:  # a shared-input A (lora.fused) casts and drops the shared x once per group: one mask per input
            u = lora_a(x, dropout)  # (..., r)
        lead = x.shape[:-1]
        if self.fuse_up_projection and _addmm_fusable(result, u, lora_b):
            out = _add_up_projection(result, u, lora_b.weight, scale)  # (N, out)
            return out if len(lead) == 1 else out.view(*lead, self.out_features)
        result = result if len(lead) == 1 else result.view(*lead, self.out_features)
        up = F.linear(u, lora_b.weight, lora_b.bias) if type(lora_b) is nn.Linear else lora_b(u)  # (..., out)
        delta = up * scale
        return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))  # (..., out): the reference

    def _add_dora_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's ``add_delta`` (``lora.dora``): ``result + (m/n - 1) (x_d W^T) + (m/n) s B A x_d``, x_d the adapter
        input after dropout; x (..., in), result (N, out) -> (..., out). Without active dropout ``x_d W^T`` is
        ``result`` less the bias, so the base is not run twice."""
        lora_a, lora_b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dtype, dropout = lora_a.weight.dtype, self.lora_dropout[name]
        dropped = type(dropout) is not nn.Identity and dropout.training
        x_d = dropout(x) if dropped else x  # (..., in)
        h = x_d if x_d.dtype == dtype else x_d.to(dtype)  # (..., in)
        u = down_product(h, lora_a.weight) if type(lora_a) is nn.Linear else lora_a(h)  # (..., r)
        up = F.linear(u, lora_b.weight, lora_b.bias) if type(lora_b) is nn.Linear else lora_b(u)  # (..., out)
        result = result.view(*x.shape[:-1], self.out_features)  # (..., out)
        base_part = self.base_layer(x_d) if dropped else result  # (..., out)
        if self.bias is not None:
            base_part = base_part - self.bias
        factor = self.lora_magnitude_vector[name].weight / self.dora_norm(name)  # (out,): m / n, n detached
        return dora_output(result, base_part, up, factor, scale)

    def dora_norm(self, name: str) -> torch.Tensor:
        """``n = ||W + s B A||_row`` of DoRA adapter ``name`` (fp32, detached): (out,). Without grad it is cached
        until A, B, the scale or the base weight change (tensor identity and in-place version)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if torch.is_grad_enabled():
            self._dora_norms.pop(name, None)
            return weight_norm(self.base_layer, a, b, self.scaling[name])
        key = (a, a._version, b, b._version, self.scaling[name], base_version(self.base_layer))
        cached = self._dora_norms.get(name)
        if cached is not None and len(cached[0]) == len(key) and all(
                k is c if isinstance(k, torch.Tensor) else k == c for k, c in zip(key, cached[0], strict=True)):
            return cached[1]
        norm = weight_norm(self.base_layer, a, b, self.scaling[name])
        self._dora_norms[name] = (key, norm)
        return norm

    def bind(self) -> Projection:
        """This forward for decoding, ``x (rows, in) -> (rows, out)``: the base's bound projection
        (``bind_linear``) plus ``add_delta`` of the adapter in use, read at every call (so switching adapters
        between requests needs no new binding). Equal to ``self(x)`` bit for bit when the base's bound
        projection is (a ``Linear4bit``; an ``nn.Linear``'s one-row dense GEMV sums in another order).
        """
        base = bind_linear(self.base_layer)

        def projection(x: torch.Tensor) -> torch.Tensor:  # x: (rows, in)
            name = self._adapter_in_use()
            result = base(x)  # (rows, out)
            return result if name is None else self.add_delta(name, x, result)

        return projection

    # --- merge ---------------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in fp32: (out_features, in_features)."""
        self._check_name(name)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        return self.scaling[name] * (b @ a)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 ``(out, in)`` weight of adapter ``name`` folded into ``weight`` (the unmerged base, fp32):
        ``W + s B A``, or for DoRA ``m/n * (W + s B A)`` with ``n = ||W + s B A||_row``."""
        combined = weight + self.delta_weight(name)  # (out, in)
        if name not in self.lora_magnitude_vector:
            return combined
        magnitude = self.lora_magnitude_vector[name].weight.detach().float()  # (out,)
        return (magnitude / torch.linalg.vector_norm(combined, dim=1)).unsqueeze(1) * combined  # (out, in)

    def _write_base(self, name: str, new: torch.Tensor) -> None:
        weight = self.base_layer.weight  # (out, in)
        new = new.to(weight.dtype)
        if not torch.isfinite(new).all():
            raise MergeError(
                f"merging adapter {name!r} gives non-finite weights in {weight.dtype} (overflow or NaN in the "
                "adapter); the base weight was left unchanged"
            )
        with torch.no_grad():
            weight.copy_(new)

    def merge(self) -> None:
        """Fold the active adapter into the base weight: ``W <- W + scale * B @ A`` (DoRA: ``m/n * (W + s B A)``)."""
        if self.merged_adapter is not None:
            raise MergeError(f"adapter {self.merged_adapter!r} is already merged")
        name = self.active_adapter
        if name is None:
            raise MergeError(f"no active adapter to merge; adapters: {self.adapter_names}")
        if isinstance(self.base_layer, Linear4bit):
            raise MergeError(
                "cannot merge a LoRA adapter into a 4-bit (Linear4bit) base in place: it would have to be "
                "re-quantized, which silently changes the base; use merge_and_export to write a 16-bit merged model"
            )
        weight = self.base_layer.weight.detach().float()  # (out, in)
        if name in self.lora_magnitude_vector:
            self._merged_norm = torch.linalg.vector_norm(weight + self.delta_weight(name), dim=1)  # (out,)
        self._write_base(name, self.merged_weight(name, weight))
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Undo ``merge``: ``W <- W - scale * B @ A`` (DoRA: ``W' n/m - s B A``), exact in fp32 up to rounding."""
        name = self.merged_adapter
        if name is None:
            raise MergeError("no adapter is merged")
        weight = self.base_layer.weight.detach().float()  # (out, in)
        if name in self.lora_magnitude_vector:
            factor = self.lora_magnitude_vector[name].weight.detach().float() / self._merged_norm  # (out,)
            weight = weight / factor.unsqueeze(1)
        self._write_base(name, weight - self.delta_weight(name))
        self.merged_adapter, self._merged_norm = None, None

    def extra_repr(self) -> str:
        ranks = {name: cfg.r for name, cfg in self.configs.items()}
        dora = [name for name in self.configs if name in self.lora_magnitude_vector]
        return f"adapters={ranks}, dora={dora}, active={self.active_adapter!r}, enabled={self.enabled}"
