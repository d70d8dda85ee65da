"""Loading the 4-bit base for ``--distributed fsdp`` without the whole of it on any rank (``--fsdp-load``).

FSDP2 keeps, per ``ShardedLinear4bit``, rank ``r``'s rows ``[r P/N, (r+1) P/N)`` of the padded integer rows
(``parallel.fsdp``: ``P`` the block count rounded up to ``N * U`` blocks, ``U = 256`` with double quantization, 1
without; a row is one quantization block). Loading the whole model on every rank and then sharding it
(``shard_for_training``'s own path) holds the whole 4-bit base on each rank until ``fully_shard``. The two
strategies here give every rank only its rows from the start, bit for bit the rows that path keeps (tested):

- ``stream`` (``StreamShard``): every rank streams the checkpoint as one process does (``models.fill``); as soon
  as a linear is quantized (or its bitsandbytes 4-bit state is read), the rank keeps its own rows
  (``fsdp.rows_of(q, N, r)``) and the tables, and the whole ``QuantizedTensor`` of that one layer is dropped.
  Quantization is deterministic, so every rank's rows are those of the whole-model result. Each rank reads the
  file and quantizes every weight (the CPU work of one load, on every rank).
- ``broadcast`` (``BroadcastSender`` on rank 0, ``BroadcastReceiver`` elsewhere): rank 0 streams and quantizes
  as above; every tensor it puts in place (embeddings, norms, biases) is broadcast whole, and each linear's
  padded rows are scattered (``dist.scatter``: rank ``r`` receives only its rows) with its small tables broadcast.
  The other ranks read the config and the checkpoint's header only, never a weight. A JSON header (as a uint8
  tensor) precedes each message; an error on rank 0 is sent as one, so the others stop with it.

Until ``fully_shard_model`` a layer loaded this way is a ``ShardedLinear4bit`` with a ``Preshard``: its
``packed_rows`` / ``absmax_rows`` parameters are this rank's rows only. ``fully_shard_model`` swaps them for
full-shape meta parameters before ``fully_shard`` (``detach_preshards``) and afterwards loads them as the local
shards of the DTensors (``attach_preshards``: ``load_state_dict(assign=True)``, after which FSDP2 re-reads its
sharded parameters; no copy). Before that, the whole weight exists only inside ``gathering()``: there each use
of ``qweight`` all-gathers the layer's rows (a collective: every rank must run the same forwards, as the packing
probe and ``add_lora`` do), and outside it ``qweight`` is refused.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qlorakit.constants import FSDP_LOAD_MODES, FSDP_LOAD_STREAM, FSDP_LOAD_WHOLE
from qlorakit.errors import ConfigError, DistributedError
from qlorakit.parallel.fsdp import ShardedLinear4bit, become_sharded, padded_blocks, rows_of, whole_weight
from qlorakit.parallel.group import Dist, collective
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.tensor import NestedState, QuantizedTensor

_GATHERING = [0]  # > 0 inside gathering()


@dataclass
class Preshard:
    """A layer loaded sharded: this rank's ``total / world`` rows of ``total`` (padded) rows."""

    world: int
    total: int

    def whole(self, layer: ShardedLinear4bit) -> QuantizedTensor:
        """The whole weight, all-gathered from every rank (inside ``gathering()`` only)."""
        if not _GATHERING[0]:
            raise RuntimeError("ShardedLinear4bit: this layer was loaded sharded (--fsdp-load); its 4-bit weight "
                               "is whole only inside parallel.fsdp_load.gathering() or, after fully_shard, inside "
                               "the FSDP forward/backward of its block")
        rows = _all_gather(layer.packed_rows.detach(), self.world)  # (P, blocksize // 2) uint8
        absmax = _all_gather(layer.absmax_rows.detach(), self.world)  # (P,)
        return whole_weight(layer._template, rows, absmax)


@contextlib.contextmanager
def gathering() -> Iterator[None]:
    """Within: a layer loaded sharded all-gathers its weight when used (every rank must run the same code)."""
    _GATHERING[0] += 1
    try:
        yield
    finally:
        _GATHERING[0] -= 1


def _all_gather(local: torch.Tensor, world: int) -> torch.Tensor:
    out = local.new_empty((local.shape[0] * world, *local.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name in torch 2.13
    gather(out, local.contiguous())
    return out


def preshard(layer: Linear4bit, q: QuantizedTensor, world: int, packed_rows: torch.Tensor,
             absmax_rows: torch.Tensor) -> ShardedLinear4bit:
    """``layer`` holding only this rank's rows of ``q`` (``q.packed``/``q.absmax`` may be empty: only its tables
    and metadata are read)."""
    sharded = become_sharded(layer, q, packed_rows, absmax_rows)
    sharded._preshard = Preshard(world=world, total=padded_blocks(q, world))
    return sharded


def preshards(model: nn.Module) -> list[ShardedLinear4bit]:
    return [m for m in model.modules() if isinstance(m, ShardedLinear4bit) and m._preshard is not None]


def detach_preshards(model: nn.Module, world: int) -> list[tuple[ShardedLinear4bit, torch.Tensor, torch.Tensor]]:
    """Before ``fully_shard``: each layer loaded sharded gets full-shape meta rows; ``(layer, its rows)``."""
    out = []
    for layer in preshards(model):
        if layer._preshard.world != world:
            raise ConfigError(f"--fsdp-load: a layer was loaded for {layer._preshard.world} ranks, the job has "
                              f"{world}")
        rows, absmax = layer.packed_rows.detach(), layer.absmax_rows.detach()
        total = layer._preshard.total
        layer.packed_rows = nn.Parameter(torch.empty((total, rows.shape[1]), dtype=rows.dtype, device="meta"),
                                         requires_grad=False)  # (P, blocksize // 2)
        layer.absmax_rows = nn.Parameter(torch.empty(total, dtype=absmax.dtype, device="meta"), requires_grad=False)
        out.append((layer, rows, absmax))
    return out


def attach_preshards(detached: list[tuple[ShardedLinear4bit, torch.Tensor, torch.Tensor]], mesh) -> None:
    """After ``fully_shard``: each layer's own rows become the local shards of its DTensor rows (no copy)."""
    from torch.distributed.tensor import DTensor, Shard

    for layer, rows, absmax in detached:
        full = {"packed_rows": layer.packed_rows, "absmax_rows": layer.absmax_rows}
        state = {name: DTensor.from_local(mine, mesh, [Shard(0)], run_check=False, shape=full[name].shape,
                                          stride=full[name].stride())
                 for name, mine in (("packed_rows", rows), ("absmax_rows", absmax))}
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if unexpected or any(k in state for k in missing):
            raise RuntimeError(f"--fsdp-load: the local rows did not load ({missing}, {unexpected})")
        layer._preshard = None


class StreamShard:
    """``models.fill.FillHooks`` of ``stream``: each rank keeps its own rows of every 4-bit linear."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def tensors(self, model, stream):
        return stream

    def placed(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def filled(self, path: str, module: Linear4bit) -> None:
        q = module.qweight
        preshard(module, q, self.world, *rows_of(q, self.world, self.rank))

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield


# --- broadcast: rank 0 reads, the others receive ------------------------------------------------------------------

def _comm_device() -> torch.device:
    """Where collectives take tensors: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DistributedError(f"rank 0 sent a tensor of unknown dtype {name!r} (the ranks run different torch?)")
    return dtype


def _send_header(header: dict) -> None:
    data = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8, device=_comm_device())
    dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=data.device), 0)
    dist.broadcast(data, 0)


def _recv_header() -> dict:
    size = torch.zeros(1, dtype=torch.int64, device=_comm_device())
    dist.broadcast(size, 0)
    data = torch.empty(int(size), dtype=torch.uint8, device=size.device)
    dist.broadcast(data, 0)
    return json.loads(bytes(data.cpu().tolist()).decode())


def _bcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` from rank 0 (on the others ``t`` is an empty tensor of the right shape); on ``t``'s device."""
    moved = t.to(_comm_device()).contiguous()
    dist.broadcast(moved, 0)
    return moved.to(t.device)


def _guarded(timeout_s: int):
    """A failed collective of the broadcast (a rank died or hung) as ``DistributedError``, naming the load."""
    return collective("the model's broadcast from rank 0 (--fsdp-load broadcast)", timeout_s)


def _template_header(q: QuantizedTensor) -> dict:
    header = {"quant_type": q.quant_type, "blocksize": q.blocksize, "shape": list(q.shape),
              "dtype": _dtype_name(q.dtype), "absmax_dtype": _dtype_name(q.absmax.dtype), "code": q.code.numel()}
    if q.nested is not None:
        header["nested"] = {"blocks": q.nested.absmax.numel(), "offset": q.nested.offset,
                            "blocksize": q.nested.blocksize, "code": q.nested.code.numel()}
    return header


def _template_tensors(q: QuantizedTensor) -> list[torch.Tensor]:
    return [q.code] + ([q.nested.absmax, q.nested.code] if q.nested is not None else [])


class BroadcastSender:
    """``models.fill.FillHooks`` of ``broadcast`` on rank 0: loads as one process, sends as it goes."""

    def __init__(self, world: int, timeout_s: int) -> None:
        self.world, self.timeout_s = world, timeout_s

    def tensors(self, model, stream):
        yield from stream
        with _guarded(self.timeout_s):
            _send_header({"kind": "end"})

    def placed(self, name: str, tensor: torch.Tensor) -> None:
        with _guarded(self.timeout_s):
            _send_header({"kind": "tensor", "name": name, "shape": list(tensor.shape),
                          "dtype": _dtype_name(tensor.dtype)})
            _bcast(tensor)

    def filled(self, path: str, module: Linear4bit) -> None:
        q = module.qweight
        packed, absmax = rows_of(q, self.world)  # (P, blocksize // 2), (P,): this one layer, whole, for a moment
        with _guarded(self.timeout_s):
            _send_header({"kind": "linear", "path": path, **_template_header(q)})
            for t in _template_tensors(q):
                _bcast(t)
            mine = [_scatter(list(torch.chunk(full, self.world))) for full in (packed, absmax)]
        preshard(module, q, self.world, *mine)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """An error while rank 0 loads is sent to the others (they raise it) before it propagates here."""
        try:
            yield
        except Exception as exc:
            with contextlib.suppress(Exception):
                _send_header({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
            raise


def _scatter(chunks: list[torch.Tensor] | None, like: torch.Tensor | None = None) -> torch.Tensor:
    """Rank 0 sends ``chunks[r]`` to rank ``r``; every rank returns its chunk (``like``: its shape, elsewhere)."""
    device = _comm_device()
    if chunks is not None:
        moved = [c.to(device).contiguous() for c in chunks]
        out = torch.empty_like(moved[0])
        dist.scatter(out, moved, src=0)
        return out.to(chunks[0].device)
    out = torch.empty_like(like, device=device)
    dist.scatter(out, None, src=0)
    return out.to(like.device)


class BroadcastReceiver:
    """``models.fill.FillHooks`` of ``broadcast`` on ranks > 0: the tensors and rows come from rank 0."""

    def __init__(self, rank: int, world: int, timeout_s: int) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s

    def tensors(self, model, stream) -> Iterable[tuple[str, torch.Tensor]]:
        del stream  # never read: rank 0 sends what it loads
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        while True:
            with _guarded(self.timeout_s):
                header = _recv_header()
            kind = header["kind"]
            if kind == "end":
                return
            if kind == "error":
                raise DistributedError(f"rank {self.rank}: rank 0 failed to load the model: {header['error']}")
            if kind == "tensor":
                with _guarded(self.timeout_s):
                    tensor = _bcast(torch.empty(header["shape"], dtype=_dtype(header["dtype"]), device=device))
                yield header["name"], tensor
            else:
                with _guarded(self.timeout_s):
                    self._receive_linear(model, header, device)

    def _receive_linear(self, model: nn.Module, header: dict, device: torch.device) -> None:
        code = _bcast(torch.empty(header["code"], dtype=torch.float32, device=device))
        nested = None
        if "nested" in header:
            n = header["nested"]
            nested_absmax = _bcast(torch.empty(n["blocks"], dtype=torch.float32, device=device))
            nested_code = _bcast(torch.empty(n["code"], dtype=torch.float32, device=device))
            nested = NestedState(absmax=nested_absmax, code=nested_code, offset=n["offset"], blocksize=n["blocksize"])
        absmax_dtype = _dtype(header["absmax_dtype"])
        empty = torch.empty(0, dtype=torch.uint8, device=device)
        q = QuantizedTensor(packed=empty, absmax=torch.empty(0, dtype=absmax_dtype, device=device), code=code,
                            quant_type=header["quant_type"], blocksize=header["blocksize"],
                            shape=tuple(header["shape"]), dtype=_dtype(header["dtype"]), nested=nested)
        rows = padded_blocks(q, self.world) // self.world
        packed = _scatter(None, torch.empty((rows, q.blocksize // 2), dtype=torch.uint8, device=device))
        row_dtype = torch.uint8 if nested is not None else torch.int32
        absmax = _scatter(None, torch.empty(rows, dtype=row_dtype, device=device))
        module = model.get_submodule(header["path"])
        if not isinstance(module, Linear4bit):
            raise DistributedError(f"rank {self.rank}: rank 0 sent 4-bit rows for {header['path']}, which is a "
                                   f"{type(module).__name__} here (the ranks disagree on the model or --quant-type)")
        preshard(module, q, self.world, packed, absmax)

    def placed(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def filled(self, path: str, module: Linear4bit) -> None:
        raise DistributedError(f"rank {self.rank}: {path} was quantized here; under --fsdp-load broadcast only "
                               "rank 0 reads the weights")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield


class _Whole(StreamShard):
    """``whole``: every rank loads the whole model; ``fully_shard_model`` shards it afterwards."""

    def __init__(self) -> None:
        super().__init__(0, 1)

    def filled(self, path: str, module: Linear4bit) -> None:
        pass


NO_SHARD = _Whole()


def load_hooks(mode: str, dist_info: Dist):
    """The ``FillHooks`` of ``mode`` (``FSDP_LOAD_MODES``) for this rank; each has ``session()``, the context
    the load runs in. ``whole``: the hooks of one process (every rank loads everything, sharded later)."""
    if mode not in FSDP_LOAD_MODES:
        raise ConfigError(f"--fsdp-load {mode!r}: must be one of {', '.join(FSDP_LOAD_MODES)}")
    if not dist_info.enabled:
        raise ConfigError(f"--fsdp-load {mode}: needs a process group (torchrun)")
    if mode == FSDP_LOAD_WHOLE:
        return NO_SHARD
    if mode == FSDP_LOAD_STREAM:
        return StreamShard(dist_info.rank, dist_info.world_size)
    if dist_info.rank == 0:
        return BroadcastSender(dist_info.world_size, dist_info.timeout_s)
    return BroadcastReceiver(dist_info.rank, dist_info.world_size, dist_info.timeout_s)


__all__ = ["BroadcastReceiver", "BroadcastSender", "Preshard", "StreamShard", "attach_preshards", "detach_preshards",
           "gathering", "load_hooks", "preshard", "preshards"]
