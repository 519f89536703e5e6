"""StorageManager: the serialized tiers below the CPU tier, in order, with health and write-back.

Invariants:
- A read from a lower tier is returned only after :mod:`kvtier.frames` verified it (checksum, MAC when
  the manager has a keyring, key, KV spec) and its record equals the caller's
  (:func:`kvtier.record.verify`); otherwise it is counted (``corrupt``, ``mac_failures`` or
  ``collisions``), discarded from that tier when damaged, and treated as a miss.
- With a keyring (``auth``) every frame written down carries a MAC under the current key.
- Reads of many chunks (:meth:`StorageManager.load_many`) are pipelined: batches of up to
  ``read_batch`` chunks (at most ``READ_BATCH_BYTES``) go to the tier in one ``get_each_into`` (a
  :class:`~kvtier.storage.base.ScatteredTier`: ``get_each_into_parts``, each payload straight into the
  caller's buffers) / ``get_many`` call on a reader thread, at most ``read_ahead`` batches ahead of the
  chunk the caller is verifying and copying; a streaming tier hands each chunk over as soon as it is in
  place. The reader thread checks each frame it read (checksum or MAC, metadata, decode into the caller's tensor) before
  handing it over, so the caller compares the record and copies chunk i while i+1 is read and checked.
  A chunk is handed out (True) only after its whole frame verified; a payload read straight into
  caller memory may already be there when verification fails (then it is garbage the caller must not
  use, and so may the payloads of chunks read ahead of it).
  Chunks are verified and handed out strictly in order; the first chunk that
  misses or fails verification ends the run (prefix semantics: it and every chunk after it are misses,
  counted as ``misses`` / ``read_ahead_dropped``). When ``load_many`` returns or its iterator is closed,
  no read into the caller's tensors is still in flight.
- A reader thread runs each batch at the CPU priority (nice value) of the thread that called
  ``load_many``: an asynchronous load at a low priority keeps its reads there too, and a later
  synchronous load's reads get the caller's priority back where the system allows raising it (else
  they stay lower, counted as ``reader_nice_refused``).
- Writes go down through one bounded queue; when it is full the write is dropped and counted, so the
  engine never waits for a slow tier. Queued writes hold a reference on their CPU slot until done.
- Write-back is a two-stage pipeline: the sealing thread encodes each queued chunk into its frame head
  (checksum, and MAC with a keyring: BLAKE3 releases the GIL) while the writer thread hands the chunks
  sealed before it to the tiers, so the MAC of chunk i+1 overlaps the write of chunk i. The writer
  takes what is sealed (up to ``WRITE_BATCH`` chunks / ``WRITE_BATCH_BYTES``) and hands it to each tier
  in one ``put_many``; a failed batch counts every write in it as failed. A write is done (its slot
  reference released, :meth:`StorageManager.flush` no longer waiting for it) only after every tier
  took it, failed it or skipped it.
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
from collections import Counter, deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from kvtier import batching, frames, wire
from kvtier.backoff import Backoff
from kvtier.errors import CorruptChunk, FrameAuthError, KvtierError, LayoutError, TierUnavailable
from kvtier.frame_auth import FrameKeys, warn_unauthenticated
from kvtier.keys import ChunkKey
from kvtier.layout import KVSpec
from kvtier.nice import set_thread_nice, thread_nice
from kvtier.queues import wait_done
from kvtier.record import ChunkRecord, verify
from kvtier.storage.base import ScatteredTier, Tier

log = logging.getLogger(__name__)

READ_BATCH_BYTES = 64 << 20  # a read batch holds at most this many payload bytes (at least one chunk)
WRITE_BATCH_BYTES = 64 << 20  # the writer hands at most this many payload bytes to one put_many
WRITE_BATCH = 16  # ... and at most this many chunks


@dataclass
class TierSlot:
    """One tier with its codec and health state."""

    tier: Tier
    backoff: Backoff
    codec: str = "raw"
    counters: Counter[str] = field(default_factory=Counter)

    def usable(self, now: float) -> bool:
        return self.backoff.ready(now)

    @property
    def reads_into(self) -> bool:
        """The tier can place payloads straight into caller memory (it overrides a ``get_into``)."""
        cls = type(self.tier)
        overridden = cls.get_into is not Tier.get_into or cls.get_many_into is not Tier.get_many_into
        return self.codec == "raw" and overridden

    @property
    def reads_scattered(self) -> bool:
        """The tier reads raw payloads straight into several buffers each (:attr:`Load.into`)."""
        return self.codec == "raw" and isinstance(self.tier, ScatteredTier)


@dataclass(frozen=True)
class Load:
    """One chunk to read: from tier ``tier`` (an index into the manager's tiers), verified against
    ``record``, decoded into ``out`` (a canonical chunk view of ``record.num_tokens`` positions)."""

    tier: int
    record: ChunkRecord
    out: torch.Tensor
    # the payload's destination as buffers in order (scattered caller memory, e.g. an engine's per-layer
    # K and V rows); ``out`` then gives only the chunk's shape (a ``meta`` tensor will do) and is not
    # written. A :class:`ScatteredTier` with the raw codec reads the payload straight into them (verified
    # there); any other tier or frame is read whole, verified, then decoded into them
    into: Sequence[memoryview] | None = None


# what the reader hands back per chunk: (head of a zero-copy read | whole frame | None, zero-copy?)
_Fetched = tuple[bytes | memoryview | None, bool]
# ... and what it passes on once it checked the frame: (metadata | why the frame was refused | None for a
# miss, bytes read)
_Checked = tuple[wire.ChunkMeta | KvtierError | None, int]


class _Stopped(BaseException):
    """The consumer of a read closed it: the reader stops at once. A ``BaseException`` so that the
    tier code it passes through (which turns every ``Exception`` into a failed call) lets it out."""


@dataclass
class _Write:
    record: ChunkRecord
    data: torch.Tensor
    done: Callable[[], None]
    # per codec of the writable tiers: (head, payload) of the frame, or why it could not be encoded;
    # filled by the sealing thread before the writer sees the write
    frames: dict[str, tuple[bytes, bytes | memoryview] | KvtierError] = field(default_factory=dict)


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
        read_batch: int = 8,
        read_ahead: int = 2,
    ) -> None:
        if read_batch < 1 or read_ahead < 1:
            raise ValueError(f"read_batch and read_ahead must be >= 1, got {read_batch} and {read_ahead}")
        self.spec = spec
        self.read_batch = read_batch
        self.read_ahead = read_ahead
        self.auth = auth
        if auth is None:  # a tier other users can write (server, Redis, shared or open directory) needs a MAC
            for tier, _codec in tiers:
                if not tier.private():
                    warn_unauthenticated(tier.name)
        self.slots = [TierSlot(tier, Backoff(base_backoff_s, max_backoff_s), codec) for tier, codec in tiers]
        self.counters: Counter[str] = Counter()
        # ``observer(tier_name, op, seconds, ok)`` after every tier call (metrics); must not raise
        self.observers: list[Callable[[str, str, float, bool], None]] = []
        # ``put_listener(tier_name, key)`` after a chunk was written to a tier (KV events); must not raise
        self.put_listeners: list[Callable[[str, bytes], None]] = []
        # a tier with ``read_only = True`` (e.g. the P2P tier) is only read: write-back skips it
        self._writable = any(not getattr(tier, "read_only", False) for tier, _codec in tiers)
        self._put_counts = threading.Lock()  # put_frame may run on several threads at once (SGLang's put threads)
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=queue_depth)
        self._sealed: queue.Queue[_Write | None] = queue.Queue(maxsize=WRITE_BATCH)
        self._codecs = sorted({codec for tier, codec in tiers if not getattr(tier, "read_only", False)})
        self._workers: list[threading.Thread] = []
        # reads of batches run here, ahead of the caller; two threads so a tier serves two batches at once
        self._reader: ThreadPoolExecutor | None = None
        if self.slots:
            self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtier-read")
            self._workers = [threading.Thread(target=self._seal, name="kvtier-seal", daemon=True),
                             threading.Thread(target=self._drain, name="kvtier-writeback", daemon=True)]
            for worker in self._workers:
                worker.start()

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
            delay = slot.backoff.failed()
            slot.counters["errors"] += 1
            log.warning("tier %s unavailable during %s (%s); retry in %.1fs", slot.tier.name, op, exc, delay)
            raise
        except Exception as exc:  # a tier bug must not reach the engine
            self._observe(slot, op, start, False)
            slot.counters["errors"] += 1
            log.exception("tier %s failed during %s", slot.tier.name, op)
            raise TierUnavailable(str(exc)) from exc
        if failures := slot.backoff.succeeded():
            log.info("tier %s is back after %d failures", slot.tier.name, failures)
            slot.counters["reconnects"] += 1
        slot.counters[f"{op}_seconds_total_us"] += int((time.perf_counter() - start) * 1e6)
        self._observe(slot, op, start, True)
        return result

    def healthy(self) -> dict[str, bool]:
        return {s.tier.name: s.backoff.failures == 0 for s in self.slots}

    # ---- reads -----------------------------------------------------------------------------------
    def locate(self, keys: Sequence[ChunkKey]) -> list[int]:
        """For the leading run of ``keys`` present in some tier, the index of the first tier holding
        each; stops at the first key no usable tier has."""
        out: list[int] = []
        for w in self.where(keys):
            if w is None:
                break
            out.append(w)
        return out

    def where(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Per key, the index of the first usable tier holding it, or ``None``: one ``exists`` call per
        tier for all of ``keys`` (no prefix rule, unlike :meth:`locate`)."""
        where: list[int | None] = [None] * len(keys)
        if not keys:
            return where
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
        return where

    def load(self, tier_index: int, record: ChunkRecord, out: torch.Tensor) -> bool:
        """Fetch ``record`` from one tier and decode it into ``out``; False on miss, damage, a failed
        MAC or a record that differs from ``record``."""
        return all(self.load_many([Load(tier_index, record, out)]))

    def load_many(self, loads: Sequence[Load]) -> Generator[bool, None, None]:
        """Read, verify and decode ``loads`` in order, reading ahead (see the module invariants).

        Yields True for each chunk now verified in its ``out``; after the first chunk that is not, yields
        False once and stops. Close the iterator (or exhaust it) before reusing any ``out``."""
        batches = self._batches(loads)
        pending: deque[tuple[list[Load], queue.SimpleQueue[_Checked], Future[None]]] = deque()
        stopped = threading.Event()
        reader = self._reader
        nice = thread_nice()  # the readers work for this thread: at its priority

        def submit() -> None:
            if not batches:
                return
            batch = batches.popleft()
            arrived: queue.SimpleQueue[_Checked] = queue.SimpleQueue()
            loads = iter(batch)  # the reader delivers each chunk of the batch once, in order

            def deliver(got: _Fetched) -> None:
                if stopped.is_set():  # the caller is gone: write nothing more into its tensors
                    raise _Stopped
                arrived.put(self._check(next(loads), got))

            try:
                if reader is None:
                    raise RuntimeError("storage manager closed")
                future = reader.submit(self._fetch_at, nice, batch, deliver)
            except RuntimeError:  # closed meanwhile: the batch is a miss
                for _load in batch:
                    arrived.put((None, 0))
                future = Future()
                future.set_result(None)
            pending.append((batch, arrived, future))

        try:
            for _ in range(self.read_ahead):
                submit()
            while pending:
                batch, arrived, future = pending.popleft()
                topped_up = False  # the next batch is asked for once this one is read, as before streaming
                for i, load in enumerate(batch):  # each chunk as soon as the reader placed it
                    checked = arrived.get()
                    if not topped_up and future.done():
                        submit()
                        topped_up = True
                    if not self._verify(load, checked):
                        dropped = len(batch) - i - 1 + sum(len(b) for b, _a, _f in pending) + sum(map(len, batches))
                        self.counters["read_ahead_dropped"] += dropped
                        yield False
                        return
                    yield True
                if not topped_up:
                    submit()
        finally:
            stopped.set()
            for _batch, _arrived, future in pending:  # nothing may still write into the caller's tensors
                future.cancel()
            for _batch, _arrived, future in pending:
                if not future.cancelled():
                    with contextlib.suppress(Exception, _Stopped):
                        future.result()

    def _batches(self, loads: Sequence[Load]) -> deque[list[Load]]:
        """Consecutive loads of one tier, at most ``read_batch`` chunks / ``READ_BATCH_BYTES`` each."""
        return deque(batching.cut(loads, self.read_batch, READ_BATCH_BYTES,
                                  lambda load: load.out.numel() * load.out.element_size(),
                                  lambda prev, load: prev.tier != load.tier))

    def _fetch_at(self, nice: int, batch: list[Load], deliver: Callable[[_Fetched], None]) -> None:
        """Reader thread: :meth:`_fetch` at nice value ``nice`` (the caller's)."""
        if not set_thread_nice(nice):
            self.counters["reader_nice_refused"] += 1
        self._fetch(batch, deliver)

    def _fetch(self, batch: list[Load], deliver: Callable[[_Fetched], None]) -> None:
        """Reader thread: ``deliver`` the frame (or zero-copy head) of each chunk of ``batch`` exactly
        once, in order, each as soon as it is in place (while later ones are still arriving, where the
        tier streams); ``None`` for each miss. A tier failure (or a bug below) makes every chunk not
        delivered yet a miss. Raises :class:`_Stopped` when ``deliver`` does (the caller is gone)."""
        slot = self.slots[batch[0].tier]
        got: list[_Fetched | None] = [None] * len(batch)
        sent = 0

        def arrived(i: int, head: bytes | memoryview | None) -> None:
            nonlocal sent
            got[i] = (head, head is not None)
            while sent < len(batch) and (item := got[sent]) is not None and item[0] is not None:
                sent += 1
                deliver(item)  # held back after a head-less chunk until its fallback read below

        try:
            if slot.usable(time.monotonic()):
                keys = [load.record.key for load in batch]
                if slot.reads_into:
                    self._fetch_into(slot, batch, keys, arrived)
                rest = [i for i in range(sent, len(batch)) if (item := got[i]) is None or item[0] is None]
                if rest:
                    found = self._call(slot, "get", partial(slot.tier.get_many, [keys[i] for i in rest]))
                    for i, frame in zip(rest, found):  # type: ignore[call-overload]
                        got[i] = (frame, False)
        except TierUnavailable:
            pass  # counted by _call; the chunks not fetched are misses
        except Exception:  # a bug below must not reach the engine: what is left of the batch is missed
            log.exception("reading a batch from tier %s failed", slot.tier.name)
            got[sent:] = [None] * (len(batch) - sent)
        for item in got[sent:]:
            deliver(item if item is not None else (None, False))

    def _fetch_into(self, slot: TierSlot, batch: list[Load], keys: list[ChunkKey],
                    arrived: Callable[[int, bytes | memoryview | None], None]) -> None:
        """Reader thread: the zero-copy reads of ``batch`` where the tier can place every payload (a
        scattered tier takes each as buffers, any other tier one contiguous ``out`` each); chunks it
        leaves head-less are read whole by the caller."""
        views = [frames.payload_view(load.out) if load.into is None else None for load in batch]
        tier = slot.tier
        if isinstance(tier, ScatteredTier):
            parts: list[Sequence[memoryview]] = []
            for load, view in zip(batch, views):
                if load.into is not None:
                    parts.append(load.into)
                elif view is not None:
                    parts.append((view,))
            if len(parts) == len(batch):
                self._call(slot, "get", partial(tier.get_each_into_parts, keys, parts, arrived))
            return
        dests = [view for view in views if view is not None]
        if len(dests) == len(batch):
            self._call(slot, "get", partial(tier.get_each_into, keys, dests, arrived))

    def _check(self, load: Load, got: _Fetched) -> _Checked:
        """Reader thread: the frame check of one fetched chunk (checksum or MAC, metadata, key, KV spec)
        and its decode into ``load.out``: the costly part of verifying, done by the thread that read the
        chunk, so the caller copies chunk i out while chunk i+1 is read and checked. Never raises."""
        data, zero_copy = got
        if data is None:
            return None, 0
        key, out = load.record.key, load.out
        try:
            if load.into is not None:
                meta = frames.unpack_into_parts(data, zero_copy, self.spec, load.into, out.shape[2], key, self.auth)
            elif zero_copy:
                meta = frames.unpack_head_into(data, self.spec, out, key, self.auth)
            else:
                meta = frames.unpack_into(data, self.spec, out, key, self.auth)
        except KvtierError as exc:
            return exc, 0
        except Exception as exc:  # a codec bug must not stop the reader: the chunk is a corrupt miss
            log.exception("checking chunk %s failed", key.hex())
            return KvtierError(f"checking the frame failed: {exc!r}"), 0
        return meta, len(data) + (out.numel() * out.element_size() if zero_copy else 0)

    def _verify(self, load: Load, checked: _Checked) -> bool:
        """The caller's side of one chunk's verification (:meth:`_check` ran on the reader): its record
        must equal the caller's; count the outcome and discard a damaged frame."""
        slot = self.slots[load.tier]
        outcome, nbytes = checked
        key = load.record.key
        if outcome is None:
            slot.counters["misses"] += 1
            return False
        if isinstance(outcome, FrameAuthError):  # not discarded: the frame may be another tenant's, valid for it
            slot.counters["mac_failures"] += 1
            log.warning("chunk %s from tier %s failed authentication: %s", key.hex(), slot.tier.name, outcome)
            return False
        if isinstance(outcome, (CorruptChunk, LayoutError)):
            slot.counters["corrupt"] += 1
            log.warning("discarding damaged chunk %s from tier %s: %s", key.hex(), slot.tier.name, outcome)
            with contextlib.suppress(KvtierError):
                slot.tier.discard(key)
            return False
        if isinstance(outcome, KvtierError):  # e.g. unknown codec in the header
            slot.counters["corrupt"] += 1
            log.warning("cannot decode chunk %s from tier %s: %s", key.hex(), slot.tier.name, outcome)
            return False
        if not verify(outcome.record(), load.record):
            slot.counters["collisions"] += 1
            return False
        slot.counters["hits"] += 1
        slot.counters["bytes_read"] += nbytes
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

    def _seal(self) -> None:
        """Sealing thread: encode each queued write for every codec, in queue order; ``None`` = stop."""
        while True:
            item = self._queue.get()
            if item is not None:
                for codec in self._codecs:
                    try:
                        item.frames[codec] = frames.pack_parts(item.record, item.data, self.spec, codec, self.auth)
                    except KvtierError as exc:
                        item.frames[codec] = exc
                    except Exception as exc:  # a codec bug must not stop write-back: this write fails
                        log.exception("encoding chunk %s as %s failed", item.record.key.hex(), codec)
                        item.frames[codec] = KvtierError(f"encoding failed: {exc!r}")
            self._sealed.put(item)
            if item is None:
                return

    def _drain(self) -> None:
        """Writer thread: hand sealed writes to the tiers, then mark them done; ``None`` = stop."""
        while True:
            batch = self._take_batch()
            try:
                self._write([item for item in batch if item is not None])
            finally:
                for item in batch:
                    if item is not None:
                        item.done()
                    self._queue.task_done()
            if batch[-1] is None:
                return

    def _take_batch(self) -> list[_Write | None]:
        """Block for one sealed write, then take what else is sealed (bounded); ``None`` = stop."""
        batch: list[_Write | None] = [self._sealed.get()]
        size = 0
        while batch[-1] is not None and len(batch) < WRITE_BATCH:
            size += batch[-1].data.numel() * batch[-1].data.element_size()
            if size >= WRITE_BATCH_BYTES:
                break
            try:
                batch.append(self._sealed.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, items: list[_Write]) -> None:
        if not items:
            return
        now = time.monotonic()
        for slot in self.slots:
            if getattr(slot.tier, "read_only", False):
                continue
            if not slot.usable(now):
                slot.counters["writes_skipped_unhealthy"] += len(items)
                continue
            try:
                batch: list[tuple[ChunkKey, tuple[bytes, bytes | memoryview]]] = []
                for item in items:  # (head, payload) per chunk: tiers write them without joining
                    parts = item.frames[slot.codec]
                    if isinstance(parts, KvtierError):
                        raise parts
                    batch.append((item.record.key, parts))
                self._call(slot, "put", partial(slot.tier.put_many, batch))
                slot.counters["writes"] += len(batch)
                for key, _parts in batch:
                    self._notify_put(slot.tier.name, key)
                slot.counters["bytes_written"] += sum(memoryview(p).nbytes for _key, parts in batch for p in parts)
            except TierUnavailable:
                slot.counters["writes_failed"] += len(items)
            except KvtierError as exc:
                slot.counters["writes_failed"] += len(items)
                log.warning("cannot encode chunks for tier %s: %s", slot.tier.name, exc)

    def writable_tiers(self) -> list[str]:
        """Names of the tiers write-back goes to, in order."""
        return [slot.tier.name for slot in self.slots if not getattr(slot.tier, "read_only", False)]

    def has_tier(self, tier: Tier) -> bool:
        """True if ``tier`` is one of this manager's tiers."""
        return any(slot.tier is tier for slot in self.slots)

    def put_frame(self, key: ChunkKey, frame: bytes | Sequence[bytes | memoryview]) -> int:
        """Write an encoded frame (or its parts in order, written without joining them) to every writable
        tier now, with the health checks and backoff of write-back; return how many tiers did not take
        it (failed or skipped as unhealthy). Safe to call from several threads at once (its counts are
        taken under a lock)."""
        parts = (frame,) if isinstance(frame, bytes) else frame
        missed = 0
        now = time.monotonic()
        for slot in self.slots:
            if getattr(slot.tier, "read_only", False):
                continue
            if not slot.usable(now):
                outcome = "writes_skipped_unhealthy"
            else:
                try:
                    self._call(slot, "put", partial(slot.tier.put_parts, key, parts))
                    outcome = "writes"
                except TierUnavailable:
                    outcome = "writes_failed"
            with self._put_counts:
                slot.counters[outcome] += 1
                if outcome == "writes":
                    slot.counters["bytes_written"] += sum(memoryview(p).nbytes for p in parts)
            missed += outcome != "writes"
        return missed

    def _notify_put(self, tier: str, key: bytes) -> None:
        for listener in self.put_listeners:
            try:
                listener(tier, key)
            except Exception:
                log.exception("put listener failed")

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued writes are done; False if ``timeout_s`` passed first."""
        return wait_done(self._queue, timeout_s)

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
            numbers["healthy"] = int(slot.backoff.failures == 0)
            try:
                numbers.update(slot.tier.stats())
            except Exception:  # stats must never fail the caller
                log.debug("stats of tier %s failed", slot.tier.name, exc_info=True)
            out[slot.tier.name] = numbers
        return out

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush pending writes (bounded), stop the worker, close tiers; return writes lost."""
        lost = 0
        if self._workers:
            if not self.flush(timeout_s):
                lost = self._queue.qsize() + self._sealed.qsize()
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
            for worker in self._workers:
                worker.join(timeout=max(1.0, timeout_s))
            self._workers = []
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        for slot in self.slots:
            try:
                slot.tier.close()
            except Exception:
                log.debug("closing tier %s failed", slot.tier.name, exc_info=True)
        return lost
