"""StorageManager: the serialized tiers below the CPU tier, in order, with health and write-back.

Invariants:
- A read from a lower tier is returned only after :mod:`kvtier.frames` verified it (checksum, MAC when
  the manager has a keyring, key, KV spec) and its record equals the caller's
  (:func:`kvtier.record.verify`); otherwise it is counted (``corrupt``, ``mac_failures`` or
  ``collisions``), discarded from that tier when damaged, and treated as a miss.
- With a keyring (``auth``) every frame written down carries a MAC under the current key.
- Writes go down through one bounded queue; when it is full the write is dropped and counted, so the
  engine never waits for a slow tier. Queued writes hold a reference on their CPU slot until done.
- A tier that raised :class:`TierUnavailable` is skipped (fast miss) until its backoff expires; then it
  is probed again by the next call. Backoff doubles per failure up to ``max_backoff_s``.
- No exception from a tier reaches the caller.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from kvtier import frames
from kvtier.errors import CorruptChunk, FrameAuthError, KvtierError, LayoutError, TierUnavailable
from kvtier.frame_auth import FrameKeys, warn_unauthenticated
from kvtier.keys import ChunkKey
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord, verify
from kvtier.storage.base import Tier

log = logging.getLogger(__name__)


@dataclass
class TierSlot:
    """One tier with its codec and health state."""

    tier: Tier
    codec: str = "raw"
    failures: int = 0
    retry_at: float = 0.0
    counters: Counter[str] = field(default_factory=Counter)

    def usable(self, now: float) -> bool:
        return self.failures == 0 or now >= self.retry_at


@dataclass
class _Write:
    record: ChunkRecord
    data: torch.Tensor
    done: Callable[[], None]


class StorageManager:
    def __init__(
        self,
        spec: KVSpec,
        tiers: Sequence[tuple[Tier, str]] = (),
        *,
        queue_depth: int = 64,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        auth: FrameKeys | None = None,
    ) -> None:
        self.spec = spec
        self.auth = auth
        if auth is None:  # every lower tier can be written by another process (disk dir, server, ...)
            for tier, _codec in tiers:
                warn_unauthenticated(tier.name)
        self.slots = [TierSlot(tier, codec) for tier, codec in tiers]
        self.counters: Counter[str] = Counter()
        # ``observer(tier_name, op, seconds, ok)`` after every tier call (metrics); must not raise
        self.observers: list[Callable[[str, str, float, bool], None]] = []
        # a tier with ``read_only = True`` (e.g. the P2P tier) is only read: write-back skips it
        self._writable = any(not getattr(tier, "read_only", False) for tier, _codec in tiers)
        self._base_backoff = base_backoff_s
        self._max_backoff = max_backoff_s
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=queue_depth)
        self._worker: threading.Thread | None = None
        if self.slots:
            self._worker = threading.Thread(target=self._drain, name="kvtier-writeback", daemon=True)
            self._worker.start()

    @property
    def enabled(self) -> bool:
        return bool(self.slots)

    # ---- health ----------------------------------------------------------------------------------
    def _observe(self, slot: TierSlot, op: str, start: float, ok: bool) -> None:
        for observer in self.observers:
            try:
                observer(slot.tier.name, op, time.perf_counter() - start, ok)
            except Exception:
                log.debug("storage observer failed", exc_info=True)

    def _call(self, slot: TierSlot, op: str, fn: Callable[[], object]) -> object:
        """Run ``fn`` against ``slot``; on failure mark it unhealthy and raise TierUnavailable."""
        start = time.perf_counter()
        try:
            result = fn()
        except TierUnavailable as exc:
            self._observe(slot, op, start, False)
            slot.failures += 1
            delay = min(self._max_backoff, self._base_backoff * 2 ** (slot.failures - 1))
            slot.retry_at = time.monotonic() + delay
            slot.counters["errors"] += 1
            log.warning("tier %s unavailable during %s (%s); retry in %.1fs", slot.tier.name, op, exc, delay)
            raise
        except Exception as exc:  # a tier bug must not reach the engine
            self._observe(slot, op, start, False)
            slot.counters["errors"] += 1
            log.exception("tier %s failed during %s", slot.tier.name, op)
            raise TierUnavailable(str(exc)) from exc
        if slot.failures:
            log.info("tier %s is back after %d failures", slot.tier.name, slot.failures)
            slot.counters["reconnects"] += 1
        slot.failures = 0
        slot.counters[f"{op}_seconds_total_us"] += int((time.perf_counter() - start) * 1e6)
        self._observe(slot, op, start, True)
        return result

    def healthy(self) -> dict[str, bool]:
        return {s.tier.name: s.failures == 0 for s in self.slots}

    # ---- reads -----------------------------------------------------------------------------------
    def locate(self, keys: Sequence[ChunkKey]) -> list[int]:
        """For the leading run of ``keys`` present in some tier, the index of the first tier holding
        each; stops at the first key no usable tier has."""
        if not keys or not self.slots:
            return []
        where: list[int | None] = [None] * len(keys)
        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            todo = [j for j, w in enumerate(where) if w is None]
            if not todo or not slot.usable(now):
                continue
            try:
                found = self._call(slot, "exists", partial(slot.tier.exists, [keys[j] for j in todo]))
            except TierUnavailable:
                continue
            for j, hit in zip(todo, found):  # type: ignore[call-overload]
                if hit:
                    where[j] = i
        out: list[int] = []
        for w in where:
            if w is None:
                break
            out.append(w)
        return out

    def load(self, tier_index: int, record: ChunkRecord, out: torch.Tensor) -> bool:
        """Fetch ``record`` from one tier and decode it into ``out``; False on miss, damage, a failed
        MAC or a record that differs from ``record``."""
        slot = self.slots[tier_index]
        if not slot.usable(time.monotonic()):
            return False
        key = record.key
        dest = frames.payload_view(out) if slot.codec == "raw" else None  # zero-copy read if the tier can
        try:
            head = None if dest is None else self._call(slot, "get", partial(slot.tier.get_into, key, dest))
            frame = head if head is not None else self._call(slot, "get", partial(slot.tier.get_view, key))
        except TierUnavailable:
            slot.counters["misses"] += 1
            return False
        if frame is None:
            slot.counters["misses"] += 1
            return False
        try:
            if head is not None:
                meta = frames.unpack_head_into(head, self.spec, out, key, self.auth)  # type: ignore[arg-type]
            else:
                meta = frames.unpack_into(frame, self.spec, out, key, self.auth)  # type: ignore[arg-type]
            if not verify(meta.record(), record):
                slot.counters["collisions"] += 1
                return False
        except FrameAuthError as exc:  # not discarded: the frame may be another tenant's, valid for it
            slot.counters["mac_failures"] += 1
            log.warning("chunk %s from tier %s failed authentication: %s", key.hex(), slot.tier.name, exc)
            return False
        except (CorruptChunk, LayoutError) as exc:
            slot.counters["corrupt"] += 1
            log.warning("discarding damaged chunk %s from tier %s: %s", key.hex(), slot.tier.name, exc)
            with contextlib.suppress(KvtierError):
                slot.tier.discard(key)
            return False
        except KvtierError as exc:  # e.g. unknown codec in the header
            slot.counters["corrupt"] += 1
            log.warning("cannot decode chunk %s from tier %s: %s", key.hex(), slot.tier.name, exc)
            return False
        slot.counters["hits"] += 1
        slot.counters["bytes_read"] += len(frame) + (dest.nbytes if head is not None and dest else 0)  # type: ignore[arg-type]
        return True

    # ---- writes ----------------------------------------------------------------------------------
    def write_back(self, record: ChunkRecord, data: torch.Tensor, done: Callable[[], None]) -> bool:
        """Queue ``data`` (a canonical chunk view) for every tier; ``done()`` runs when it is no longer
        needed, also when the write is dropped. Returns False if dropped."""
        if not self._writable:
            done()
            return False
        try:
            self._queue.put_nowait(_Write(record, data, done))
            return True
        except queue.Full:
            self.counters["writes_dropped_queue_full"] += 1
            done()
            return False

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(item)
            finally:
                if item is not None:
                    item.done()
                self._queue.task_done()

    def _write(self, item: _Write) -> None:
        encoded: dict[str, tuple[bytes, bytes | memoryview]] = {}
        now = time.monotonic()
        for slot in self.slots:
            if getattr(slot.tier, "read_only", False):
                continue
            if not slot.usable(now):
                slot.counters["writes_skipped_unhealthy"] += 1
                continue
            try:
                frame = encoded.get(slot.codec)
                if frame is None:  # (head, payload): tiers write them without joining (put_parts)
                    frame = frames.pack_parts(item.record, item.data, self.spec, slot.codec, self.auth)
                    encoded[slot.codec] = frame
                self._call(slot, "put", partial(slot.tier.put_parts, item.record.key, frame))
                slot.counters["writes"] += 1
                slot.counters["bytes_written"] += sum(memoryview(p).nbytes for p in frame)
            except TierUnavailable:
                slot.counters["writes_failed"] += 1
            except KvtierError as exc:
                slot.counters["writes_failed"] += 1
                log.warning("cannot encode chunk for tier %s: %s", slot.tier.name, exc)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued writes are done; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # ---- management ------------------------------------------------------------------------------
    def delete(self, key: ChunkKey) -> int:
        removed = 0
        for slot in self.slots:
            with contextlib.suppress(TierUnavailable):
                removed += bool(self._call(slot, "delete", partial(slot.tier.delete, key)))
        return removed

    def clear(self) -> int:
        total = 0
        for slot in self.slots:
            with contextlib.suppress(TierUnavailable):
                total += int(self._call(slot, "clear", slot.tier.clear))  # type: ignore[call-overload]
        return total

    def stats(self) -> dict[str, dict[str, int | float]]:
        out: dict[str, dict[str, int | float]] = {"manager": {**self.counters, "queue_depth": self._queue.qsize()}}
        for slot in self.slots:
            numbers: dict[str, int | float] = dict(slot.counters)
            numbers["healthy"] = int(slot.failures == 0)
            try:
                numbers.update(slot.tier.stats())
            except Exception:  # stats must never fail the caller
                log.debug("stats of tier %s failed", slot.tier.name, exc_info=True)
            out[slot.tier.name] = numbers
        return out

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush pending writes (bounded), stop the worker, close tiers; return writes lost."""
        lost = 0
        if self._worker is not None:
            if not self.flush(timeout_s):
                lost = self._queue.qsize()
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
            self._worker.join(timeout=max(1.0, timeout_s))
            self._worker = None
        for slot in self.slots:
            try:
                slot.tier.close()
            except Exception:
                log.debug("closing tier %s failed", slot.tier.name, exc_info=True)
        return lost
