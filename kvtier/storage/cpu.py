"""CPU tier: an index of verified chunks living in :class:`~kvtier.memory.Arena` slots.

Invariants: every indexed key owns one slot holding exactly its ``num_tokens`` positions; a lookup
succeeds only if the caller's record equals the stored one (:func:`kvtier.record.verify`); a referenced
or pinned entry is never evicted; when every slot is busy a store is refused and counted, never grown.

Admission (the one way a chunk enters the tier, :meth:`CpuTier.admit` or, for a fill that spans several
calls of the caller, :meth:`CpuTier.reserve` + :class:`Admission`): reserve slots for a prefix of the
records (evicting by policy; stops at the first record no slot is free for) -> the caller fills them
and verifies what it filled -> the filled, verified prefix is committed (indexed) and every other
reserved slot is given back. A reserved slot is referenced, so it is never evicted or handed out twice
while it is filled; a record whose key got indexed meanwhile by someone else keeps that entry and gives
our slot back.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from kvtier.keys import KEY_BYTES, ChunkKey
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


def _hashed_of(record: ChunkRecord) -> bytes:
    """``parent || identity`` of a well-formed token record: the bytes its key is the hash of
    (:func:`kvtier.keys.chain_key`); ``b""`` (never a lookup's hashed bytes) for any other record."""
    if record.kind == Kind.TOKENS and len(record.parent) == KEY_BYTES and len(record.identity) == 4 * record.num_tokens:
        return record.parent + record.identity
    return b""


class CpuTier:
    """Thread-safe; one lock guards the index, the policy and the arena bookkeeping."""

    name = "cpu"

    def __init__(self, spec: KVSpec, capacity_bytes: int, policy: str = "lru") -> None:
        self.spec = spec
        self.arena = Arena(spec, capacity_bytes)
        self._policy = make_policy(policy)
        self._index: dict[ChunkKey, Entry] = {}
        self._hashed: dict[ChunkKey, bytes] = {}  # same keys as _index: _hashed_of(entry.record)
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

    def leading_hits(self, keys: list[ChunkKey], hashed: list[bytes]) -> int:
        """How many chunks, from the first, are present and verified (one lock round): ``keys`` and
        ``hashed`` are :meth:`kvtier.keys.Chunker.hashed`'s (key ``k_i`` and the bytes ``k_{i-1} ||
        tokens`` it was hashed from, per chunk).

        The same check as :func:`kvtier.record.verify` of each chunk's token record, shaped for the
        lookup hot path: the index keeps, per token record, ``parent || identity`` (:func:`_hashed_of`),
        which equals the caller's hashed bytes iff parent and token ids are equal (the parent is a
        fixed :data:`~kvtier.keys.KEY_BYTES` long; length and kind follow from the ids), so a lookup is
        one C-level dict ``get`` per key and one list compare."""
        with self._lock:
            stored = list(map(self._hashed.get, keys))
        if stored == hashed:
            return len(stored)
        present = stored.index(None) if None in stored else len(stored)
        if stored[:present] == hashed[:present]:
            return present
        self.counters["collisions"] += 1  # a stored record differs from the caller's: the first one ends the hit
        return next(i for i, (mine, theirs) in enumerate(zip(stored, hashed)) if mine != theirs)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def capacity_bytes(self) -> int:
        return self.arena.capacity_bytes

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
    def _reserve_one(self) -> int | None:
        """A referenced free slot, evicting by policy (lock held); ``None`` (counted) if all are busy."""
        slot = self.arena.allocate()
        if slot is None:
            victim = cast(ChunkKey | None, self._policy.victim(lambda k: not self._busy(k)))
            if victim is None:
                self.counters["store_refused_all_busy"] += 1
                return None
            slot = self._index.pop(victim).slot  # reuse the victim's slot directly
            del self._hashed[victim]
            self.counters["evictions"] += 1
            self._emit("evict", victim)
        self.arena.ref(slot)
        return slot

    def reserve(self, records: Sequence[ChunkRecord]) -> Admission:
        """Reserve slots for the longest prefix of ``records`` there is room for (see the module
        docstring); finish the returned admission with ``commit`` or ``abort``."""
        slots: list[int] = []
        with self._lock:
            for _record in records:
                slot = self._reserve_one()
                if slot is None:
                    break
                slots.append(slot)
        slots.sort()  # ascending: consecutive slots let a store or retrieve copy a run of chunks at once
        return Admission(self, list(records[: len(slots)]), slots)

    def admit(self, records: Sequence[ChunkRecord], fill: Callable[[list[int]], int], *,
              keep: bool = False) -> list[int | None]:
        """Reserve -> ``fill(slots)`` -> commit: ``fill`` gets the reserved slots (for a prefix of
        ``records``), writes the chunks into them and returns how many of them, from the first, it
        filled and verified; those are indexed and the rest given back. An exception from ``fill``
        gives back every slot and propagates.

        Returns one item per admitted record: with ``keep``, its slot still referenced for the caller
        (who must :meth:`release` it), or ``None`` where the key was already indexed (our copy was
        dropped, the existing entry stays); without ``keep`` the slots are released here."""
        admission = self.reserve(records)
        try:
            filled = fill(admission.slots)
        except BaseException:
            admission.abort()
            raise
        admitted = admission.commit(filled)
        if not keep:
            for slot in admitted:
                if slot is not None:
                    self.release(slot)
        return admitted

    def _commit(self, record: ChunkRecord, slot: int) -> bool:
        """Index the filled, referenced ``slot`` under ``record.key`` (lock held); False (slot freed) if
        the key is already present."""
        if record.key in self._index:
            self.arena.unref(slot)
            self.arena.free(slot)
            return False
        self._index[record.key] = Entry(slot, record)
        self._hashed[record.key] = _hashed_of(record)
        self._policy.insert(record.key)
        self._emit("admit", record.key)
        return True

    def _abort(self, slots: Sequence[int]) -> None:
        with self._lock:
            for slot in slots:
                self.arena.unref(slot)
                self.arena.free(slot)

    # ---- management ----------------------------------------------------------------------------
    def pin(self, key: ChunkKey) -> bool:
        return self._on_slot(key, self.arena.pin)

    def unpin(self, key: ChunkKey) -> bool:
        return self._on_slot(key, self.arena.unpin)

    def _on_slot(self, key: ChunkKey, op: Callable[[int], None]) -> bool:
        """``op(slot)`` on the slot of ``key`` under the lock; False if ``key`` is not cached."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            op(entry.slot)
            return True

    def remove(self, key: ChunkKey) -> bool:
        """Drop ``key`` unless it is busy; True if it was removed."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None or self.arena.busy(entry.slot):
                return False
            del self._index[key]
            del self._hashed[key]
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


class Admission:
    """Slots reserved by :meth:`CpuTier.reserve` for ``records`` (same length, same order). Fill
    ``view(i)``, then call :meth:`commit` or :meth:`abort` exactly once."""

    def __init__(self, cpu: CpuTier, records: list[ChunkRecord], slots: list[int]) -> None:
        self._cpu = cpu
        self.records = records
        self.slots = slots
        self._open = True

    def __len__(self) -> int:
        return len(self.slots)

    def view(self, i: int) -> torch.Tensor:
        """The canonical chunk view of reserved slot ``i`` (``records[i].num_tokens`` positions)."""
        return self._cpu.arena.view(self.slots[i], self.records[i].num_tokens)

    def commit(self, filled: int) -> list[int | None]:
        """Index the first ``filled`` records (their slots hold verified chunks), give back the rest.
        Returns, per indexed record, its slot still referenced for the caller (release it), or
        ``None`` where the key was indexed meanwhile by someone else (our slot was given back)."""
        if not self._open:
            raise RuntimeError("admission already finished")
        if not 0 <= filled <= len(self.slots):
            raise ValueError(f"filled={filled}: expected 0..{len(self.slots)} reserved slots")
        self._open = False
        cpu = self._cpu
        out: list[int | None] = []
        with cpu._lock:
            for record, slot in zip(self.records[:filled], self.slots[:filled]):
                out.append(slot if cpu._commit(record, slot) else None)
        cpu._abort(self.slots[filled:])
        return out

    def abort(self) -> None:
        """Give back every reserved slot (nothing is indexed). A no-op after ``commit``/``abort``."""
        if self._open:
            self._open = False
            self._cpu._abort(self.slots)
