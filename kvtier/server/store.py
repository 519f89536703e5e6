"""The server's chunk store: a byte-capped in-memory map, optionally backed by a :class:`DiskTier`.

Invariants:
- ``MemoryStore.used_bytes`` (frame bytes plus :data:`ENTRY_OVERHEAD` per entry) never exceeds
  ``capacity_bytes``: an insert evicts by policy first, and a frame larger than the whole capacity is
  refused.
- With persistence, a PUT is acknowledged only after the disk tier's ``put`` returned (durable when the
  disk tier fsyncs); memory is a cache of the disk, so a memory eviction loses nothing and a restarted
  server serves every key the disk index holds.
- Frames enter the store only after :func:`kvtier.wire.check_frame`; frames read back from
  disk are verified again before they are served or cached.
- Memory operations run on the event loop thread (no lock needed); disk operations run in worker threads
  (the disk tier is thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from kvtier.errors import CorruptChunk, KvtierError
from kvtier.storage.policy import make_policy
from kvtier.wire import check_frame

if TYPE_CHECKING:
    from kvtier.storage.base import Tier

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 160  # dict slot, key object, bytearray header, policy node (approximate)
Frame = bytes | bytearray


class MemoryStore:
    """Key -> frame map with a byte cap and a :mod:`kvtier.storage.policy` eviction policy."""

    def __init__(self, capacity_bytes: int, policy: str = "lru") -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._data: dict[bytes, Frame] = {}
        self._policy = make_policy(policy)
        self.used_bytes = 0
        self.counters: Counter[str] = Counter()

    @staticmethod
    def cost(frame: Frame) -> int:
        return len(frame) + ENTRY_OVERHEAD

    def put(self, key: bytes, frame: Frame) -> bool:
        """Insert or replace; False (nothing changed but the old entry dropped) if it can never fit."""
        self.delete(key)
        need = self.cost(frame)
        if need > self.capacity_bytes:
            self.counters["refused_too_large"] += 1
            return False
        while self.used_bytes + need > self.capacity_bytes:
            victim = self._policy.victim(lambda _k: True)
            if victim is None:  # cannot happen while used_bytes > 0; guard against a policy bug
                self.counters["refused_no_victim"] += 1
                return False
            old = self._data.pop(victim)  # type: ignore[call-overload]
            self.used_bytes -= self.cost(old)
            self.counters["evictions"] += 1
        self._data[key] = frame
        self._policy.insert(key)
        self.used_bytes += need
        return True

    def get(self, key: bytes) -> Frame | None:
        frame = self._data.get(key)
        if frame is not None:
            self._policy.touch(key)
        return frame

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def delete(self, key: bytes) -> bool:
        frame = self._data.pop(key, None)
        if frame is None:
            return False
        self._policy.remove(key)
        self.used_bytes -= self.cost(frame)
        return True

    def clear(self) -> int:
        n = len(self._data)
        for key in list(self._data):
            self.delete(key)
        return n

    def keys(self) -> list[bytes]:
        return list(self._data)


class ChunkStore:
    """What the server's command handlers talk to: memory, plus the disk tier when persistence is on."""

    def __init__(self, capacity_bytes: int, policy: str = "lru", disk: Tier | None = None) -> None:
        self.memory = MemoryStore(capacity_bytes, policy)
        self.disk = disk
        self.counters: Counter[str] = Counter()

    @property
    def persistent(self) -> bool:
        return self.disk is not None

    async def put(self, key: bytes, frame: Frame) -> bool:
        """Store a verified frame; False if refused (larger than the memory capacity)."""
        if self.disk is not None:  # DiskTier writes any buffer; the cast avoids copying the bytearray
            await asyncio.to_thread(self.disk.put, key, cast(bytes, frame))
        stored = self.memory.put(key, frame)
        self.counters["puts" if stored else "puts_refused"] += 1
        return stored or self.disk is not None

    async def get(self, key: bytes) -> Frame | None:
        frame = self.memory.get(key)
        if frame is not None:
            self.counters["hits_memory"] += 1
            return frame
        if self.disk is None:
            self.counters["misses"] += 1
            return None
        frame = await asyncio.to_thread(self.disk.get, key)
        if frame is None:
            self.counters["misses"] += 1
            return None
        try:
            check_frame(frame, key)
        except CorruptChunk as exc:
            log.warning("persisted chunk %s is damaged (%s); discarding it", key.hex(), exc)
            self.counters["corrupt_on_disk"] += 1
            await asyncio.to_thread(self.disk.discard, key)
            return None
        self.counters["hits_disk"] += 1
        self.memory.put(key, frame)
        return frame

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        found = [k in self.memory for k in keys]
        if self.disk is not None and not all(found):
            on_disk = self.disk.exists([k for k, f in zip(keys, found, strict=True) if not f])  # in-memory index
            it = iter(on_disk)
            found = [f or next(it) for f in found]
        return found

    async def delete(self, keys: Sequence[bytes]) -> list[bool]:
        out = [self.memory.delete(k) for k in keys]
        if self.disk is not None:
            disk = self.disk
            on_disk = await asyncio.to_thread(lambda: [disk.delete(k) for k in keys])
            out = [a or b for a, b in zip(out, on_disk, strict=True)]
        return out

    async def clear(self) -> int:
        keys = set(self.memory.keys())
        self.memory.clear()
        if self.disk is not None:
            keys.update(self._disk_keys())
            await asyncio.to_thread(self.disk.clear)
        return len(keys)

    def _disk_keys(self) -> list[bytes]:
        lister = getattr(self.disk, "keys", None)
        return list(lister()) if lister is not None else []

    def sorted_keys(self) -> list[bytes]:
        keys = set(self.memory.keys())
        if self.disk is not None:
            keys.update(self._disk_keys())
        return sorted(keys)

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            "chunks_memory": len(self.memory),
            "bytes_memory": self.memory.used_bytes,
            "capacity_bytes": self.memory.capacity_bytes,
            "evictions": self.memory.counters["evictions"],
            **self.counters,
        }
        if self.disk is not None:
            try:
                out.update({f"disk_{k}": v for k, v in self.disk.stats().items()})
            except KvtierError:
                out["disk_stats_failed"] = 1
        return out

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
