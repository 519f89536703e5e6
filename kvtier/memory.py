"""The CPU arena: one tensor allocated once, cut into fixed-size chunk slots.

Invariants: the arena never allocates after construction; a slot is either free or owned by exactly
one caller of :meth:`Arena.allocate`; a slot with a positive refcount or pin count is never handed to
:meth:`Arena.free` by correct owners (``free`` raises if it is). :meth:`Arena.allocate` hands out the
lowest free slot, so chunks stored together after slots were freed (cleared, removed) land in
consecutive slots again and move as one ``copy_`` (freed in any order, they would scatter).
The arena lives in transparent huge pages where Linux offers them: a store or retrieve copies a run of
chunks from or to an engine tensor in ``[layers, 2, tokens, ...]`` order, jumping across the arena in
strides of a chunk, and 2 MiB pages keep those jumps out of the TLB's misses.
"""

from __future__ import annotations

import contextlib
import heapq
import mmap
import threading

import torch

from kvtier.errors import ConfigError
from kvtier.layout import KVSpec


class Arena:
    """Preallocated slots of one full canonical chunk each."""

    def __init__(self, spec: KVSpec, capacity_bytes: int) -> None:
        slots = capacity_bytes // spec.chunk_bytes
        if slots < 1:
            raise ConfigError(
                f"cpu.capacity {capacity_bytes} bytes holds no chunk; one chunk of this model needs "
                f"{spec.chunk_bytes} bytes"
            )
        self.spec = spec
        self.num_slots = int(slots)
        self.buffer = _zeroed((self.num_slots, *spec.chunk_shape()), spec.torch_dtype)
        self._free = list(range(self.num_slots))  # a min-heap of free slots
        self._refs = [0] * self.num_slots
        self._pins = [0] * self.num_slots
        self._lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.spec.chunk_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """Take the lowest free slot, or ``None`` if none is free (the caller evicts and retries)."""
        with self._lock:
            return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        """Return ``slot`` to the free list. Precondition: nobody references or pins it."""
        with self._lock:
            if self._refs[slot] or self._pins[slot]:
                raise RuntimeError(f"slot {slot} freed while referenced or pinned")
            heapq.heappush(self._free, slot)

    def view(self, slot: int, tokens: int | None = None) -> torch.Tensor:
        """The canonical chunk tensor of ``slot`` (first ``tokens`` positions)."""
        full = self.buffer[slot]
        return full if tokens is None else full[:, :, :tokens]

    def ref(self, slot: int) -> None:
        with self._lock:
            self._refs[slot] += 1

    def unref(self, slot: int) -> None:
        with self._lock:
            if self._refs[slot] <= 0:
                raise RuntimeError(f"slot {slot} released more often than referenced")
            self._refs[slot] -= 1

    def pin(self, slot: int) -> None:
        with self._lock:
            self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        with self._lock:
            if self._pins[slot] > 0:
                self._pins[slot] -= 1

    def busy(self, slot: int) -> bool:
        """True while the slot is referenced or pinned (it must not be evicted)."""
        return bool(self._refs[slot] or self._pins[slot])

    def pinned(self, slot: int) -> bool:
        return bool(self._pins[slot])


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor whose every page is faulted in now, not during the first store; on Linux in
    private anonymous memory advised for transparent huge pages (used when the kernel's THP mode is
    ``madvise`` or ``always``; a kernel without THP leaves 4 KiB pages)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return torch.zeros(shape, dtype=dtype)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP compiled out: plain pages
        region.madvise(advice)
    buffer = torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # keeps ``region`` alive
    return buffer.zero_()  # anonymous pages read as zeros already: the write only faults them in
