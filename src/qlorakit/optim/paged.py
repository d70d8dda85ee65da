"""``PagedStateStore``: the optimizer state of large parameters, resident only within a byte budget.

Each parameter's state (two fp32 moments, or 8-bit codes + absmax) is one block of ``nbytes`` bytes
(tensors at 64-byte aligned offsets, the total rounded up to the backend's granularity: a 4 KiB page on
CPU, 512 B on CUDA). Its home is outside resident memory (a memory-mapped file on CPU, pinned host memory
on CUDA; see ``paging_backends``). The optimizer brackets each parameter's update with

    views = store.acquire(key, prefetch=next_key)     # page in (and start paging in the next block)
    ... update the views in place ...
    store.release(key)                                # the block may now be written back and released

and the store keeps the invariant, checked on every change and recorded as ``peak_resident_bytes``:

    resident_bytes = sum(nbytes of resident blocks) + bytes still being written back <= budget_bytes

Eviction order: a released block stays resident while it fits; when room is needed the most recently
released block goes first (MRU). The optimizer visits blocks in the same order every step, a cyclic scan
for which LRU is the worst policy (it evicts exactly the block needed next, so every block is paged in
every step) and MRU close to the best: blocks that fit stay resident from one step to the next (with room
for 3 of 4 equal blocks: 1-2 page-ins per step instead of 4).

With ``measure_pages=True`` (CPU, Linux) the store also reads the kernel's count of its resident pages
(``/proc/self/pagemap``) at each release, the point where residency peaks, and keeps the maximum in
``peak_measured_bytes``; a test holds it under the budget too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlorakit.errors import ConfigError
from qlorakit.optim.paging_backends import FileBackend, PinnedBackend

#: Name -> (shape, dtype) of one parameter's state tensors.
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]

_ALIGN = 64


@dataclass(frozen=True)
class Block:
    """Where each state tensor of one parameter sits inside its uint8 block."""

    offsets: dict[str, int]
    layout: Layout
    nbytes: int  # padded to the backend's granularity

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of ``buffer`` (uint8, (nbytes,)), one per state tensor."""
        out = {}
        for name, (shape, dtype) in self.layout.items():
            size = math.prod(shape) * dtype.itemsize
            start = self.offsets[name]
            out[name] = buffer[start : start + size].view(dtype).view(shape)
        return out


def pack_block(layout: Layout, granularity: int) -> Block:
    """Place the tensors of ``layout`` at 64-byte aligned offsets; round the total up to ``granularity``."""
    offsets, cursor = {}, 0
    for name, (shape, dtype) in layout.items():
        offsets[name] = cursor
        cursor += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    nbytes = max(granularity, -(-cursor // granularity) * granularity)
    return Block(offsets=offsets, layout=dict(layout), nbytes=nbytes)


class PagedStateStore:
    """Optimizer state blocks keyed by parameter index, at most ``budget_bytes`` of them resident at once."""

    def __init__(
        self,
        device: torch.device | str,
        budget_bytes: int | None = None,
        directory: str | None = None,
        measure_pages: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.backend: FileBackend | PinnedBackend = PinnedBackend(self.device)
        elif self.device.type == "cpu":
            self.backend = FileBackend(directory)
        else:
            raise ConfigError(f"paged optimizer state supports cpu and cuda parameters, not {self.device.type}")
        self.budget_bytes = budget_bytes
        self.measure_pages = measure_pages
        self.blocks: dict[int, Block] = {}
        self.resident: dict[int, None] = {}  # resident keys, ordered by release (last = most recent)
        self.in_use: set[int] = set()
        self.peak_resident_bytes = 0
        self.peak_measured_bytes = 0
        self.page_ins = 0

    # --- sizes and accounting --------------------------------------------------------------------

    def block_bytes(self, layout: Layout) -> int:
        """Bytes one parameter with this state layout occupies when resident."""
        return pack_block(layout, self.backend.granularity).nbytes

    @property
    def total_bytes(self) -> int:
        return sum(block.nbytes for block in self.blocks.values())

    @property
    def resident_bytes(self) -> int:
        return sum(self.blocks[key].nbytes for key in self.resident) + self.backend.in_flight_bytes()

    def _record(self) -> None:
        resident = self.resident_bytes
        if self.budget_bytes is not None and resident > self.budget_bytes:
            raise RuntimeError(f"paged optimizer state: {resident:,} bytes resident, over the budget of "
                               f"{self.budget_bytes:,} (a bug in PagedStateStore's accounting)")
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident)

    def check_fits(self, nbytes: int, what: str) -> None:
        """Raise ``ConfigError`` if one block of ``nbytes`` cannot be resident within the budget."""
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise ConfigError(
                f"page_budget_bytes={self.budget_bytes:,} is smaller than the optimizer state of one parameter: "
                f"{what} needs {nbytes:,} bytes resident; raise page_budget_bytes to at least {nbytes:,}, or raise "
                f"page_min_size above this parameter's size to keep its state out of the paged store"
            )

    # --- life cycle of a block -------------------------------------------------------------------

    def __contains__(self, key: int) -> bool:
        return key in self.blocks

    def allocate(self, key: int, layout: Layout, what: str = "a parameter") -> None:
        """Create the zero-initialised block of ``key`` (replacing an existing one)."""
        block = pack_block(layout, self.backend.granularity)
        self.check_fits(block.nbytes, what)
        if key in self.blocks:
            self._evict(key)
        self.backend.allocate(key, block.nbytes)
        self.blocks[key] = block

    def acquire(self, key: int, prefetch: int | None = None) -> dict[str, torch.Tensor]:
        """Page in ``key``'s block and return its state views; start paging in ``prefetch``'s block."""
        if key not in self.resident:
            if not self._make_room(self.blocks[key].nbytes, keep={key}):
                busy = sorted(self.in_use)
                raise RuntimeError(f"paged optimizer state: no room for block {key} while blocks {busy} are in use; "
                                   "release each block before acquiring the next")
            self.backend.load(key)
            self.resident[key] = None
            self.page_ins += 1
            self._record()
        self.in_use.add(key)
        if prefetch is not None and prefetch != key:
            self._prefetch(prefetch, keep={key})
        return self.blocks[key].views(self.backend.buffer(key))

    def release(self, key: int) -> None:
        """The update of ``key`` is done: its block becomes the first candidate for eviction."""
        self.in_use.discard(key)
        self.resident.pop(key, None)
        self.resident[key] = None
        if self.measure_pages:
            measured = self.backend.measured_bytes()
            if measured is not None:
                self.peak_measured_bytes = max(self.peak_measured_bytes, measured)

    def _prefetch(self, key: int, keep: set[int]) -> None:
        if key in self.resident:
            return
        if not self.backend.copies_on_prefetch:
            self.backend.hint(key)
            return
        if self._make_room(self.blocks[key].nbytes, keep=keep | {key}, wait=False):
            self.backend.load(key)
            self.resident = {key: None, **self.resident}  # first in line: evicted last
            self.page_ins += 1
            self._record()

    def _make_room(self, nbytes: int, keep: set[int], wait: bool = True) -> bool:
        """Evict released blocks (most recently released first) until ``nbytes`` more fit the budget."""
        if self.budget_bytes is None:
            return True
        while self.resident_bytes + nbytes > self.budget_bytes:
            victims = [k for k in reversed(self.resident) if k not in keep and k not in self.in_use]
            if victims:
                self._evict(victims[0])
            elif self.backend.in_flight_bytes() and wait:
                self.backend.wait_in_flight()
            else:
                return False
        return True

    def _evict(self, key: int) -> None:
        if key in self.resident:
            self.backend.unload(key)
            del self.resident[key]

    # --- whole-state access (state_dict / load_state_dict) ---------------------------------------

    def read(self, key: int) -> dict[str, torch.Tensor]:
        """Copies of ``key``'s state tensors on CPU (paged in and released like an update, within the budget)."""
        views = self.acquire(key)
        try:
            return {name: view.to("cpu", copy=True) for name, view in views.items()}
        finally:
            self.release(key)

    def write(self, key: int, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite ``key``'s state with ``tensors`` (names and shapes as its layout)."""
        views = self.acquire(key)
        try:
            for name, view in views.items():
                view.copy_(tensors[name])
        finally:
            self.release(key)
