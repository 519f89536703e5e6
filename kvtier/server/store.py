"""The server's chunk store: a byte-capped in-memory map per server, namespaced by tenant, optionally
backed by one :class:`DiskTier` per tenant.

Invariants:
- A tenant's keys live in their own namespace: the memory map key is ``namespace(tenant) + key`` and a
  tenant's persisted chunks live in their own directory, so no operation of one tenant can read, list,
  overwrite or delete another tenant's chunk. The default tenant ``""`` has the empty namespace (the
  layout of a server without tenants).
- ``MemoryStore.used_bytes`` (frame bytes plus :data:`ENTRY_OVERHEAD` per entry) never exceeds
  ``capacity_bytes``, and a tenant's bytes never exceed its quota: an insert evicts by policy first
  (the tenant's own chunks for its quota), and a frame larger than the capacity or quota is refused
  before anything is evicted.
- ``ChunkStore.put`` returns ``""`` only when what the server promises is true: the frame is in memory,
  or, with persistence, the tenant's disk tier indexed it (durable when the disk tier fsyncs; memory is
  then a cache of the disk, so a memory eviction loses nothing). Otherwise it returns the reason and the
  server answers an error.
- Frames enter the store only after :func:`kvtier.wire.check_frame` (structure and key; the payload
  checksum is the reader's to verify, see :mod:`kvtier.server.app`); frames read back from disk pass
  :func:`kvtier.wire.check_intact` (checksum too) before they are served or cached: a damaged file,
  or a damaged frame a client put, is discarded there and counted ``corrupt_on_disk``.
- Memory operations run on the event loop thread (no lock needed); disk operations run in worker threads
  (the disk tier is thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvtier.errors import CorruptChunk, KvtierError
from kvtier.storage.policy import make_policy
from kvtier.storage.remote_protocol import KEY_BYTES
from kvtier.wire import check_intact

if TYPE_CHECKING:
    from kvtier.storage.disk import DiskTier

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 160  # dict slot, key object, buffer header, policy node (approximate)
Frame = bytes | bytearray | memoryview | np.ndarray  # ndarray: a received body (see kvtier.server.pool)


def as_buffer(frame: Frame) -> bytes | bytearray | memoryview:
    """``frame`` as a bytes-like object (a received body is a numpy array)."""
    return frame.data if isinstance(frame, np.ndarray) else frame


def namespace(tenant: str) -> bytes:
    """The prefix of a tenant's memory keys (tenant names never contain ``/``; see ``check_tenant``)."""
    return tenant.encode() + b"/" if tenant else b""


class MemoryStore:
    """Namespaced key -> frame map with a byte cap, per-namespace quotas and a
    :mod:`kvtier.storage.policy` eviction policy. Keys are ``namespace + 16-byte chunk key``."""

    def __init__(self, capacity_bytes: int, policy: str = "lru") -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._data: dict[bytes, Frame] = {}
        self._policy = make_policy(policy)
        self.used_bytes = 0
        self.ns_bytes: Counter[bytes] = Counter()
        self.counters: Counter[str] = Counter()
        # called with each frame the map lets go of (the server reuses its buffer when nothing else
        # holds it: see kvtier.server.pool); the frame is held only by the caller's local variable
        self.on_drop: Callable[[Frame], None] | None = None

    @staticmethod
    def cost(frame: Frame) -> int:
        return len(frame) + ENTRY_OVERHEAD

    def put(self, key: bytes, frame: Frame, quota: int = 0) -> bool:
        """Insert or replace; False (nothing evicted, only an old entry of ``key`` dropped) if it can
        never fit the capacity or the namespace's ``quota`` (0 = none)."""
        self.delete(key)
        need = self.cost(frame)
        ns = key[:-KEY_BYTES]
        if need > self.capacity_bytes or (quota and need > quota):
            self.counters["refused_too_large"] += 1
            return False
        while quota and self.ns_bytes[ns] + need > quota:
            if not self._evict(lambda k: k[:-KEY_BYTES] == ns):
                return False
        while self.used_bytes + need > self.capacity_bytes:
            if not self._evict(lambda _k: True):
                return False
        self._data[key] = frame
        self._policy.insert(key)
        self.used_bytes += need
        self.ns_bytes[ns] += need
        return True

    def _evict(self, evictable: object) -> bool:
        victim = self._policy.victim(evictable)  # type: ignore[arg-type]
        if victim is None:  # cannot happen while bytes are used; guard against a policy bug
            self.counters["refused_no_victim"] += 1
            return False
        self._forget(victim)  # type: ignore[arg-type]
        self.counters["evictions"] += 1
        return True

    def _forget(self, key: bytes) -> bool:
        frame = self._data.pop(key, None)
        if frame is None:
            return False
        cost = self.cost(frame)
        self.used_bytes -= cost
        self.ns_bytes[key[:-KEY_BYTES]] -= cost
        if self.on_drop is not None:
            self.on_drop(frame)
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
        if not self._forget(key):
            return False
        self._policy.remove(key)
        return True

    def clear(self) -> int:
        n = len(self._data)
        for key in list(self._data):
            self.delete(key)
        return n

    def keys(self) -> list[bytes]:
        return list(self._data)


class ChunkStore:
    """What the server's command handlers talk to: memory, plus a disk tier per tenant when persistence
    is on. Every call names the tenant whose namespace it works in."""

    def __init__(self, capacity_bytes: int, policy: str = "lru", disks: Mapping[str, DiskTier] | None = None,
                 quotas: Mapping[str, int] | None = None) -> None:
        self.memory = MemoryStore(capacity_bytes, policy)
        self.disks: dict[str, DiskTier] = dict(disks or {})
        self.quotas: dict[str, int] = dict(quotas or {})
        self.counters: Counter[str] = Counter()

    @property
    def persistent(self) -> bool:
        return bool(self.disks)

    def _disk(self, tenant: str) -> DiskTier | None:
        return self.disks.get(tenant)

    async def put(self, tenant: str, key: bytes, frame: Frame) -> str:
        """Store a frame whose structure was checked; ``""`` once it is held as promised, else why it was refused.
        Raises :class:`KvtierError` when the disk tier fails."""
        quota = self.quotas.get(tenant, 0)
        disk = self._disk(tenant)
        if disk is not None:
            if not await asyncio.to_thread(disk.write, key, (as_buffer(frame),)):
                self.counters["puts_refused"] += 1
                return (f"persistence refused the frame of {len(frame)} bytes (persist capacity "
                        f"{disk.capacity_bytes} bytes, or the filesystem is full)")
            self.memory.put(namespace(tenant) + key, frame, quota)  # a cache of the disk: may not fit
            self.counters["puts"] += 1
            return ""
        if not self.memory.put(namespace(tenant) + key, frame, quota):
            self.counters["puts_refused"] += 1
            limit = f"tenant quota of {quota}" if quota else f"store capacity of {self.memory.capacity_bytes}"
            return f"frame of {len(frame)} bytes exceeds the {limit} bytes"
        self.counters["puts"] += 1
        return ""

    async def get(self, tenant: str, key: bytes) -> Frame | None:
        mkey = namespace(tenant) + key
        frame = self.memory.get(mkey)
        if frame is not None:
            self.counters["hits_memory"] += 1
            return frame
        disk = self._disk(tenant)
        if disk is None:
            self.counters["misses"] += 1
            return None
        frame = await asyncio.to_thread(disk.get, key)
        if frame is None:
            self.counters["misses"] += 1
            return None
        try:
            check_intact(frame, key)
        except CorruptChunk as exc:
            log.warning("persisted chunk %s is damaged (%s); discarding it", key.hex(), exc)
            self.counters["corrupt_on_disk"] += 1
            await asyncio.to_thread(disk.discard, key)
            return None
        self.counters["hits_disk"] += 1
        self.memory.put(mkey, frame, self.quotas.get(tenant, 0))
        return frame

    def exists(self, tenant: str, keys: Sequence[bytes]) -> list[bool]:
        ns = namespace(tenant)
        found = [ns + k in self.memory for k in keys]
        disk = self._disk(tenant)
        if disk is not None and not all(found):
            on_disk = disk.exists([k for k, f in zip(keys, found, strict=True) if not f])  # in-memory index
            it = iter(on_disk)
            found = [f or next(it) for f in found]
        return found

    async def delete(self, tenant: str, keys: Sequence[bytes]) -> list[bool]:
        ns = namespace(tenant)
        out = [self.memory.delete(ns + k) for k in keys]
        disk = self._disk(tenant)
        if disk is not None:
            on_disk = await asyncio.to_thread(lambda: [disk.delete(k) for k in keys])
            out = [a or b for a, b in zip(out, on_disk, strict=True)]
        return out

    async def clear(self) -> int:
        """Remove every tenant's chunks (an admin operation); return how many distinct chunks went."""
        names = set(self.memory.keys())
        self.memory.clear()
        for tenant, disk in self.disks.items():
            on_disk = disk.keys()
            names.update(namespace(tenant) + k for k in on_disk)
            await asyncio.to_thread(disk.clear)
        return len(names)

    def sorted_keys(self, tenant: str) -> list[bytes]:
        """The tenant's chunk keys (16 bytes each), sorted."""
        ns = namespace(tenant)
        held = self.memory.keys()
        keys = {k[len(ns) :] for k in held if k[:-KEY_BYTES] == ns}
        disk = self._disk(tenant)
        if disk is not None:
            keys.update(disk.keys())
        return sorted(keys)

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            "chunks_memory": len(self.memory),
            "bytes_memory": self.memory.used_bytes,
            "capacity_bytes": self.memory.capacity_bytes,
            "evictions": self.memory.counters["evictions"],
            **self.counters,
        }
        for tenant, disk in self.disks.items():
            prefix = f"disk_{tenant}_" if tenant else "disk_"
            try:
                out.update({f"{prefix}{k}": v for k, v in disk.stats().items()})
            except KvtierError:
                out[f"{prefix}stats_failed"] = 1
        return out

    def close(self) -> None:
        for disk in self.disks.values():
            disk.close()
