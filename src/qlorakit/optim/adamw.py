"""AdamW with 32-bit or 8-bit state, optionally paged out of resident memory.

Decoupled weight decay (Loshchilov & Hutter 2019), QLoRA's optimizer (section 3, "paged optimizers").
For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...``:

    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

- **32-bit** state (fp32 ``exp_avg``, ``exp_avg_sq``): the operations of ``torch.optim.AdamW``'s
  single-tensor path (its default for CPU parameters) in the same order — ``m.lerp_(g, 1 - b1)``,
  ``v.mul_(b2).addcmul_(g, g, 1 - b2)``, the bias corrections in Python double, ``addcdiv_`` — so fp32
  parameters and state are bit-identical to it (0 ulp; the tests hold this over 50 steps).
- **8-bit** state (``optim_bits=8``): both moments blockwise-quantized as bitsandbytes'
  ``AdamW8bit`` does, bit-identical to it on CPU (``state8bit``). Parameters with fewer than
  ``min_8bit_size`` elements keep 32-bit state (as bitsandbytes), updated by the 32-bit path above.
  When the parameters are shards of larger ones (FSDP, ``whole_numels``), that choice follows the whole
  parameter's size, so a shard keeps the state kind one process keeps for the whole tensor.
- **Paged** (``paged=True``): the state of every parameter with at least ``page_min_size`` elements lives
  in a ``PagedStateStore`` (memory-mapped file on CPU, pinned host memory on CUDA) and at most
  ``page_budget_bytes`` of it is resident at once; the numbers are the same as unpaged.

State is fp32 (or 8-bit) whatever the parameter dtype; a bf16/fp16 parameter is updated in an fp32 copy and
written back (as bitsandbytes does; ``torch.optim.AdamW`` would keep bf16 state). ``state_dict()`` holds
plain tensors only — ``step`` (0-d fp32, as torch), then ``exp_avg``/``exp_avg_sq`` or
``exp_avg_codes``/``exp_avg_absmax``/``exp_avg_sq_codes``/``exp_avg_sq_absmax`` — so it can be saved with
safetensors; loading it back continues bit-for-bit.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from qlorakit.constants import OPTIMIZER_NAMES
from qlorakit.errors import ConfigError
from qlorakit.optim.paged import Layout, PagedStateStore
from qlorakit.optim.state8bit import adamw_update_8bit, layout_8bit
from qlorakit.optim.state_io import checked_state, describe

#: Names accepted by ``make_optimizer``.

#: Parameters with fewer elements keep their state resident when paging (LoRA factors with r >= 4 at
#: hidden size 4096 are above it; bitsandbytes pages from 1e5 elements, which would leave r = 16 adapters unpaged).
PAGE_MIN_SIZE = 16384


@torch.no_grad()
def adamw_update_32bit(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update with fp32 state, operation for operation as ``torch.optim.adam._single_tensor_adam``."""
    beta1, beta2 = betas
    p32 = p if p.dtype == torch.float32 else p.float()  # same shape as p
    g = grad if grad.dtype == torch.float32 else grad.float()
    if weight_decay != 0:
        p32.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p32.addcdiv_(exp_avg, denom, value=-step_size)
    if p32 is not p:
        p.copy_(p32)


def _check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ConfigError(f"AdamW lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"AdamW betas must be two values in [0, 1), got {tuple(betas)}")
    if not eps >= 0.0:
        raise ConfigError(f"AdamW eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ConfigError(f"AdamW weight_decay must be >= 0, got {weight_decay}")


class AdamW(torch.optim.Optimizer):
    """AdamW with 32-bit or 8-bit (bitsandbytes-compatible) state, optionally paged; see the module docstring.

    Args beyond torch's: ``optim_bits`` 32 or 8; ``min_8bit_size``: parameters with fewer elements keep
    32-bit state (bitsandbytes' 4096); ``paged``: keep the state of parameters with at least
    ``page_min_size`` (default ``PAGE_MIN_SIZE``, read at construction) elements in a ``PagedStateStore``
    (``self.store``) with at most ``page_budget_bytes`` resident (default: twice the largest paged parameter's
    state; smaller than one parameter's state is a ``ConfigError``); ``page_dir``: directory of the CPU state
    files (default the system temp dir);
    ``measure_pages``: have the CPU store also measure its resident pages with the kernel (tests);
    ``whole_numels``: when the parameters are shards (FSDP), the element count of each whole parameter, in
    parameter order: the 8-bit / 32-bit choice uses it instead of the shard's size (paging still uses the
    shard's: it is about this process's memory).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        paged: bool = False,
        page_budget_bytes: int | None = None,
        min_8bit_size: int = 4096,
        page_min_size: int | None = None,
        page_dir: str | None = None,
        measure_pages: bool = False,
        whole_numels: Sequence[int] | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if optim_bits not in (32, 8):
            raise ConfigError(f"AdamW optim_bits must be 32 or 8, got {optim_bits}")
        if page_budget_bytes is not None and (not paged or page_budget_bytes <= 0):
            raise ConfigError(f"page_budget_bytes={page_budget_bytes} needs paged=True and a positive byte count")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        all_params = self._all_params()
        if whole_numels is not None and len(whole_numels) != len(all_params):
            raise ConfigError(f"whole_numels has {len(whole_numels)} entries for {len(all_params)} parameters")
        self._whole_numel = {id(p): n for p, n in zip(all_params, whole_numels or (), strict=False)}
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.page_min_size = PAGE_MIN_SIZE if page_min_size is None else page_min_size  # read now: tests lower it
        self.store: PagedStateStore | None = None
        if paged:
            self.store = PagedStateStore(self._device(), None, page_dir, measure_pages)
            largest = max((self.store.block_bytes(self._layout(p)) for p in self._paged_params()), default=0)
            self.store.budget_bytes = page_budget_bytes if page_budget_bytes is not None else 2 * largest
            self._check_budget(self._all_params())

    # --- parameters and their state layout -------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _paged_params(self) -> list[torch.Tensor]:
        return [p for p in self._all_params() if self._is_paged(p)]

    def _device(self) -> torch.device:
        devices = {p.device for p in self._all_params()}
        if len(devices) > 1:
            raise ConfigError(f"a paged AdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        return devices.pop() if devices else torch.device("cpu")

    def _is_paged(self, p: torch.Tensor) -> bool:
        return getattr(self, "store", None) is not None and p.numel() >= self.page_min_size

    def _layout(self, p: torch.Tensor) -> Layout:
        """Name -> (shape, dtype) of ``p``'s state tensors: 8-bit codes + absmax, or two fp32 moments."""
        if self.optim_bits == 8 and self._whole_numel.get(id(p), p.numel()) >= self.min_8bit_size:
            return layout_8bit(p.shape)
        return {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32)}

    def _check_budget(self, params: list[torch.Tensor]) -> None:
        """Raise ``ConfigError`` naming the largest paged parameter of ``params`` if its state exceeds the budget."""
        assert self.store is not None
        index = {id(q): i for i, q in enumerate(self._all_params())}
        sized = [(self.store.block_bytes(self._layout(p)), index[id(p)], p) for p in params if self._is_paged(p)]
        if sized:
            nbytes, i, p = max(sized, key=lambda item: item[0])
            self.store.check_fits(nbytes, describe(i, p))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "store", None) is not None:
            self._device()
            self._check_budget(list(self.param_groups[-1]["params"]))

    def state_nbytes(self) -> dict[str, int]:
        """Bytes of optimizer state: ``unpaged`` tensors, ``paged`` store total and its ``paged_resident`` part."""
        unpaged = sum(
            t.numel() * t.element_size()
            for state in self.state.values()
            for name, t in state.items()
            if name != "step"
        )
        if self.store is None:
            return {"unpaged": unpaged, "paged": 0, "paged_resident": 0}
        return {"unpaged": unpaged, "paged": self.store.total_bytes, "paged_resident": self.store.resident_bytes}

    # --- the update ------------------------------------------------------------------------------

    def _init_state(self, index: int, p: torch.Tensor) -> None:
        layout = self._layout(p)
        state: dict[str, torch.Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        if self._is_paged(p):
            assert self.store is not None
            self.store.allocate(index, layout, describe(index, p))
        else:
            for name, (shape, dtype) in layout.items():
                state[name] = torch.zeros(shape, dtype=dtype, device=p.device)
        self.state[p] = state

    def _apply(self, group: dict[str, Any], p: torch.Tensor, tensors: dict[str, torch.Tensor], step: float) -> None:
        hyper = (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
        if "exp_avg_codes" in tensors:
            adamw_update_8bit(p, p.grad, tensors, int(step), *hyper)
        else:
            adamw_update_32bit(p, p.grad, tensors["exp_avg"], tensors["exp_avg_sq"], step, *hyper)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient; paged blocks are visited in parameter order."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, i, p) for i, (group, p) in enumerate(self._group_params()) if p.grad is not None]
        for _, index, p in work:
            if p.grad.is_sparse:
                raise ConfigError(f"AdamW does not support sparse gradients ({describe(index, p)})")
            if not self.state[p]:
                self._init_state(index, p)
        paged = [index for _, index, p in work if self._is_paged(p)]
        following = dict(itertools.pairwise(paged))
        for group, index, p in work:
            state = self.state[p]
            state["step"] += 1
            step = state["step"].item()
            if self._is_paged(p):
                assert self.store is not None
                tensors = self.store.acquire(index, prefetch=following.get(index))
                try:
                    self._apply(group, p, tensors, step)
                finally:
                    self.store.release(index)
            else:
                self._apply(group, p, state, step)
        return loss

    def _group_params(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"]]

    # --- state dict ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state`` by parameter index, ``param_groups``) with paged tensors read back in."""
        sd = super().state_dict()
        params = self._all_params()
        state = {}
        for index, entry in sd["state"].items():
            entry = dict(entry)
            if self._is_paged(params[index]) and self.store is not None and index in self.store:
                entry.update(self.store.read(index))
            state[index] = entry
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (keys may be ints or strings); shapes and layouts are checked first."""
        params = self._all_params()
        layouts = [self._layout(p) for p in params]
        entries = checked_state(state_dict, self.param_groups, params, layouts, self.optim_bits)
        self.state = defaultdict(dict)
        for index, entry in entries.items():
            p, layout = params[index], layouts[index]
            step = torch.tensor(float(entry["step"]), dtype=torch.float32)
            if self._is_paged(p):
                assert self.store is not None
                self.store.allocate(index, layout, describe(index, p))
                self.store.write(index, {name: entry[name] for name in layout})
                self.state[p] = {"step": step}
            else:
                tensors = {name: entry[name].to(p.device, dtype, copy=True) for name, (_, dtype) in layout.items()}
                self.state[p] = {"step": step, **tensors}
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
            group["betas"] = tuple(group["betas"])


def make_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    budget_bytes: int | None = None,
    whole_numels: Sequence[int] | None = None,
) -> AdamW:
    """``adamw`` | ``adamw8bit`` | ``paged_adamw`` | ``paged_adamw8bit``; ``budget_bytes`` is for the paged ones;
    ``whole_numels``: the whole parameters' sizes when ``params`` are shards (``AdamW``)."""
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    paged = name.startswith("paged_")
    if budget_bytes is not None and not paged:
        raise ConfigError(f"budget_bytes applies to paged optimizers only; use 'paged_{name}' or drop budget_bytes")
    return AdamW(
        params,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        optim_bits=8 if name.endswith("8bit") else 32,
        paged=paged,
        page_budget_bytes=budget_bytes,
        whole_numels=whole_numels,
    )
