"""CPU tier: an index of verified chunks living in :class:`~kvtier.memory.Arena` slots.

Invariants: every indexed key owns one slot holding exactly its ``num_tokens`` positions; a lookup
succeeds only if the caller's record equals the stored one (:func:`kvtier.record.verify`); a referenced or pinned
entry is never evicted; when every slot is busy a store is refused and counted, never grown.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from kvtier.keys import Chunk, ChunkKey
from kvtier.layout import KVSpec
from kvtier.memory import Arena
from kvtier.record import ChunkRecord, Kind, verify
from kvtier.storage.policy import make_policy

log = logging.getLogger(__name__)

# ``listener(kind, key)`` with kind "admit" (a key was indexed) or "evict" (a key left the index, by
# eviction, remove or clear). Called with the tier's lock held: it must be quick, must not block and
# must not call back into the tier. An exception from a listener is logged and ignored.
Listener = Callable[[str, ChunkKey], None]


@dataclass
class Entry:
    slot: int
    record: ChunkRecord


class CpuTier:
    """Thread-safe; one lock guards the index, the policy and the arena bookkeeping."""

    name = "cpu"

    def __init__(self, spec: KVSpec, capacity_bytes: int, policy: str = "lru") -> None:
        self.spec = spec
        self.arena = Arena(spec, capacity_bytes)
        self._policy = make_policy(policy)
        self._index: dict[ChunkKey, Entry] = {}
        self._lock = threading.RLock()
        self.counters: Counter[str] = Counter()
        self.listeners: list[Listener] = []

    def _emit(self, kind: str, key: ChunkKey) -> None:
        for listener in self.listeners:
            try:
                listener(kind, key)
            except Exception:  # a listener (metrics, cluster agent) must never break the tier
                log.exception("cpu tier listener failed")

    # ---- queries -------------------------------------------------------------------------------
    def _verified(self, record: ChunkRecord) -> Entry | None:
        entry = self._index.get(record.key)
        if entry is None:
            return None
        if not verify(entry.record, record):
            self.counters["collisions"] += 1
            return None
        return entry

    def contains(self, record: ChunkRecord) -> bool:
        with self._lock:
            return self._verified(record) is not None

    def leading_hits(self, chunks: list[Chunk], tokens: np.ndarray) -> int:
        """How many of ``chunks``, from the first, are present and verified (one lock round)."""
        data = tokens.tobytes()  # one copy; slicing bytes is ~2x cheaper than slicing the array per chunk
        tokens_kind = Kind.TOKENS
        with self._lock:
            get = self._index.get
            for count, c in enumerate(chunks):
                entry = get(c.key)
                if entry is None:
                    return count
                if not verify(entry.record, ChunkRecord(c.key, c.parent, data[c.start * 4 : c.end * 4],
                                                        tokens_kind, c.end - c.start)):
                    self.counters["collisions"] += 1
                    return count
            return len(chunks)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return len(self._index) * self.spec.chunk_bytes

    # ---- reading -------------------------------------------------------------------------------
    def acquire(self, record: ChunkRecord) -> int | None:
        """Reference the verified slot of ``record`` (caller must :meth:`release` it), or ``None``."""
        with self._lock:
            entry = self._verified(record)
            if entry is None:
                return None
            self.arena.ref(entry.slot)
            self._policy.touch(record.key)
            return entry.slot

    def acquire_key(self, key: ChunkKey) -> tuple[int, ChunkRecord] | None:
        """Reference the slot of ``key`` without token verification (for serving the chunk to a peer,
        which verifies the frame itself); the caller must :meth:`release` the slot."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            self.arena.ref(entry.slot)
            return entry.slot, entry.record

    def release(self, slot: int) -> None:
        self.arena.unref(slot)

    def _busy(self, key: object) -> bool:
        return self.arena.busy(self._index[cast(ChunkKey, key)].slot)

    # ---- writing -------------------------------------------------------------------------------
    def reserve(self) -> int | None:
        """Take a slot for a new chunk, evicting by policy; ``None`` (counted) if all are busy.

        The returned slot is referenced: fill it, then :meth:`commit` or :meth:`abort`.
        """
        with self._lock:
            slot = self.arena.allocate()
            if slot is None:
                victim = cast(ChunkKey | None, self._policy.victim(lambda k: not self._busy(k)))
                if victim is None:
                    self.counters["store_refused_all_busy"] += 1
                    return None
                slot = self._index.pop(victim).slot  # reuse the victim's slot directly
                self.counters["evictions"] += 1
                self._emit("evict", victim)
            self.arena.ref(slot)
            return slot

    def commit(self, record: ChunkRecord, slot: int) -> bool:
        """Index the filled ``slot`` under ``record.key`` and drop the reservation's reference.

        Returns False (and frees the slot) if the key is already present.
        """
        with self._lock:
            self.arena.unref(slot)
            if record.key in self._index:
                self.arena.free(slot)
                return False
            self._index[record.key] = Entry(slot, record)
            self._policy.insert(record.key)
            self._emit("admit", record.key)
            return True

    def abort(self, slot: int) -> None:
        """Give back a reserved slot that was not committed."""
        with self._lock:
            self.arena.unref(slot)
            self.arena.free(slot)

    # ---- management ----------------------------------------------------------------------------
    def pin(self, key: ChunkKey) -> bool:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            self.arena.pin(entry.slot)
            return True

    def unpin(self, key: ChunkKey) -> bool:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            self.arena.unpin(entry.slot)
            return True

    def remove(self, key: ChunkKey) -> bool:
        """Drop ``key`` unless it is busy; True if it was removed."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None or self.arena.busy(entry.slot):
                return False
            del self._index[key]
            self._policy.remove(key)
            self.arena.free(entry.slot)
            self._emit("evict", key)
            return True

    def clear(self) -> int:
        """Drop every entry that is not busy; return how many were dropped."""
        with self._lock:
            return sum(self.remove(key) for key in list(self._index))

    def keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._index)
