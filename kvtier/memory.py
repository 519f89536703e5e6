"""The CPU arena: one tensor allocated once, cut into fixed-size chunk slots.

Invariants: the arena never allocates after construction; a slot is either free or owned by exactly
one caller of :meth:`Arena.allocate`; a slot with a positive refcount or pin count is never handed to
:meth:`Arena.free` by correct owners (``free`` raises if it is). :meth:`Arena.allocate` hands out the
lowest free slot, so chunks stored together after slots were freed (cleared, removed) land in
consecutive slots again and move as one ``copy_`` (freed in any order, they would scatter).
"""

from __future__ import annotations

import heapq
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
        # zeros (not empty) so every page is faulted in now, not during the first store
        self.buffer = torch.zeros((self.num_slots, *spec.chunk_shape()), dtype=spec.torch_dtype)
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
