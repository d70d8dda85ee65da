"""Where paged optimizer state lives and how it moves: a memory-mapped file (CPU) or pinned host memory (CUDA).

Both backends hold each parameter's state as one zero-initialised uint8 *block* (the state tensors are
views into it at aligned offsets) and expose the same four moves, which ``PagedStateStore`` orders and
accounts for:

- ``load(key)``: make the block resident (CPU: ``madvise(MADV_POPULATE_WRITE)`` faults its pages in
  from the page cache or the file in one call; CUDA: allocate a device buffer and copy host -> device on
  a side stream, asynchronously);
- ``buffer(key)``: the resident uint8 block, safe to use on the current stream;
- ``unload(key)``: write back and release (CPU: ``madvise(MADV_DONTNEED)`` drops the pages from the
  process while the shared file mapping keeps their contents; CUDA: device -> host on the side stream,
  after the compute stream's work on the block, then free the device buffer);
- ``hint(key)``: cheap read-ahead that costs no budget (CPU: ``MADV_WILLNEED``; CUDA: nothing).

CPU: one temporary file per block (unlinked at once, so nothing is left behind; the mapping keeps it
alive), mapped ``MAP_SHARED`` with ``torch.from_file``. One file per block gives each block its own VMA,
so the kernel's fault-around never maps a neighbouring block's pages; ``/proc/self/pagemap`` tells
exactly which of a block's pages are resident. Put the directory on a disk: on tmpfs the "paged-out" state stays in
RAM (as shared memory, outside this process's RSS).

CUDA: unified memory (``cudaMallocManaged`` with ``cudaMemPrefetchAsync``, what bitsandbytes' paged
optimizers use) is not reachable from PyTorch without a C extension, so qlorakit pages explicitly:
pinned host blocks, device buffers allocated on a side stream, ``record_stream`` so the caching
allocator never hands a buffer out while another stream still uses it, and events to order the copies
against the update.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
import tempfile

import torch


def _libc_madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()

#: Linux >= 5.14: fault a range in, writable, in one call (~2.5x faster than touching it page by page).
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)


def madvise(block: torch.Tensor, advice: int | None) -> None:
    """``madvise`` the pages of a page-aligned mapped CPU tensor (a no-op where the call is unavailable)."""
    if _MADVISE is None or advice is None or block.numel() == 0:
        return
    if _MADVISE(block.data_ptr(), block.numel() * block.element_size(), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed on the optimizer state mapping: {os.strerror(err)}")


def present_bytes(ranges: list[tuple[int, int]]) -> int | None:
    """Bytes of the page-aligned [start, end) ``ranges`` that are present in this process's page tables.

    Reads ``/proc/self/pagemap`` (8 bytes per virtual page, bit 63 = present): exactly the pages the
    kernel counts in the process's RSS for these mappings. None where pagemap does not exist (non-Linux).
    """
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    present = 0
    try:
        for start, end in ranges:
            first, count = start // mmap.PAGESIZE, -(-(end - start) // mmap.PAGESIZE)
            entries = os.pread(fd, 8 * count, 8 * first)
            present += sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63)
    finally:
        os.close(fd)
    return present * mmap.PAGESIZE


class FileBackend:
    """CPU: each block is a ``MAP_SHARED`` mapping of its own (unlinked) temporary file."""

    granularity = mmap.PAGESIZE
    copies_on_prefetch = False

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self.home: dict[int, torch.Tensor] = {}  # key -> mapped uint8 (nbytes,)
        self.populate = MADV_POPULATE_WRITE is not None

    def allocate(self, key: int, nbytes: int) -> None:
        fd, path = tempfile.mkstemp(prefix="qlorakit-optim-state-", suffix=".bin", dir=self.directory)
        try:
            os.ftruncate(fd, nbytes)  # a sparse file reads as zeros
        finally:
            os.close(fd)
        try:
            self.home[key] = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        finally:
            os.unlink(path)

    def load(self, key: int) -> None:
        """Fault the block's pages in, writable (else they fault in from page cache or file when touched)."""
        if self.populate:
            try:
                madvise(self.home[key], MADV_POPULATE_WRITE)
            except OSError:  # EINVAL before Linux 5.14: touching the pages does the same, only slower
                self.populate = False

    def buffer(self, key: int) -> torch.Tensor:
        return self.home[key]

    def unload(self, key: int) -> None:
        madvise(self.home[key], mmap.MADV_DONTNEED)

    def hint(self, key: int) -> None:
        madvise(self.home[key], getattr(mmap, "MADV_WILLNEED", None))

    def in_flight_bytes(self) -> int:
        return 0

    def wait_in_flight(self) -> None:
        """Unloading is synchronous on CPU."""

    def measured_bytes(self) -> int | None:
        """Resident bytes of all blocks as the kernel counts them (Linux ``/proc/self/pagemap``), else None."""
        return present_bytes([(t.data_ptr(), t.data_ptr() + t.numel()) for t in self.home.values()])


class PinnedBackend:
    """CUDA: pinned host blocks; device buffers filled and drained by async copies on a side stream."""

    granularity = 512
    copies_on_prefetch = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.home: dict[int, torch.Tensor] = {}  # key -> pinned uint8 (nbytes,)
        self.buffers: dict[int, torch.Tensor] = {}  # key -> device uint8 (nbytes,)
        self.loaded: dict[int, torch.cuda.Event] = {}  # key -> host->device copy done
        self.in_flight: list[tuple[torch.cuda.Event, int]] = []  # device->host copies not yet known done

    def allocate(self, key: int, nbytes: int) -> None:
        self.home[key] = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)

    def load(self, key: int) -> None:
        with torch.cuda.stream(self.stream):
            buf = torch.empty_like(self.home[key], device=self.device)
            buf.copy_(self.home[key], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.buffers[key], self.loaded[key] = buf, event

    def buffer(self, key: int) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.loaded[key])
        buf = self.buffers[key]
        buf.record_stream(current)
        return buf

    def unload(self, key: int) -> None:
        buf = self.buffers.pop(key)
        del self.loaded[key]
        updated = torch.cuda.Event()
        updated.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(updated)
        with torch.cuda.stream(self.stream):
            self.home[key].copy_(buf, non_blocking=True)
            written = torch.cuda.Event()
            written.record(self.stream)
        self.in_flight.append((written, buf.numel()))

    def hint(self, key: int) -> None:
        """Prefetching on CUDA is a real ``load`` (it costs budget), done by the store."""

    def in_flight_bytes(self) -> int:
        self.in_flight = [(event, n) for event, n in self.in_flight if not event.query()]
        return sum(n for _, n in self.in_flight)

    def wait_in_flight(self) -> None:
        self.stream.synchronize()
        self.in_flight.clear()

    def measured_bytes(self) -> int | None:
        return None
