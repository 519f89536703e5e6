"""CacheEngine: the public API engines call.

Semantics (all methods are thread-safe):
- ``lookup(tokens)`` -> number of leading tokens whose chunks are all present (CPU or a lower tier) and
  verified against ``tokens``. A full hit ending in a stored partial chunk returns ``len(tokens)``.
- ``store(tokens, kv)`` copies the chunks of ``tokens`` not yet cached out of ``kv`` into CPU slots
  and returns once the copy is done; writes to lower tiers continue in the background through a
  bounded queue. Returns the length of the cached prefix after the call (a refused chunk stops it).
- ``retrieve(tokens, into)`` writes the longest cached prefix into ``into`` and returns its length
  ``hit``: positions ``[0, hit)`` hold the cached KV. Lower-tier hits are read in batches ahead of the
  chunk being verified (``StorageManager.load_many``); the first chunk that misses or fails
  verification ends the hit, and a chunk counts (is part of ``hit``) only after its whole frame
  verified (checksum or MAC, key, record).
  With ``cpu.promote`` (default) they are promoted: read straight into the CPU slots they are admitted
  to, then copied out, and nothing outside ``[0, hit)`` is written. Without it they are read for this
  retrieve only and the CPU tier is left as it was (no admission, no eviction): a raw frame from a
  :class:`~kvtier.storage.base.ScatteredTier` is received straight into ``into`` when ``into`` is CPU
  memory whose per-layer K and V rows are contiguous (each plane ``[layer, k|v, start:end]`` one run),
  every other chunk through a bounded scratch buffer that is dropped after the copy-out. Then
  positions from ``hit`` on that were asked of a lower tier MAY have been overwritten (a chunk that
  failed verification, and chunks read ahead of it); callers recompute from ``hit`` on.
- ``retrieve_to(tokens, sink)`` and ``store_from(tokens, source)`` are ``retrieve`` and ``store``
  without a canonical tensor in between (an engine with its own layout moves each chunk straight
  between a CPU slot and its buffers): ``sink(start, end, view)`` gets each verified chunk of the hit,
  in order, as a canonical ``[layers, 2, end - start, heads, dim]`` view valid during the call only (its
  CPU slot, the slot it was just promoted into, or without promotion the scratch it was read into);
  ``source(start, end, view)`` fills the view of the slot reserved for that chunk. A chunk counts once
  its sink returned (retrieve) or once its whole admission group was filled (store). An exception from
  the callback propagates after every slot was released; nothing of the retrieve's promotion, nor of
  the store's group being filled, was admitted (the store's earlier groups stay cached).
- Every chunk enters the CPU tier through one admission path (:meth:`CpuTier.admit`): store, the
  layer-wise store, promotion and chunks fetched by the cluster agent (:meth:`admit_frame`).
- The KV spec's ``chunk_tokens`` must equal the config's (a :class:`ConfigError` otherwise).
- ``layerwise_store`` / ``layerwise_retrieve`` do the same one layer at a time so an engine can overlap
  transfers with compute.
- Nothing here raises because a tier failed: a failed tier is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch

from kvtier import batching, frames
from kvtier.config import KvtierConfig, load_config
from kvtier.errors import ConfigError, KvtierError
from kvtier.frame_auth import FrameKeys
from kvtier.keys import Chunk, Chunker, ChunkKey, Namespace, Tokens
from kvtier.layout import KVSpec
from kvtier.namespace_probe import NamespaceProbe
from kvtier.record import ChunkRecord, token_record, token_records, verify
from kvtier.storage.base import Tier
from kvtier.storage.cpu import CpuTier
from kvtier.storage.manager import Load, StorageManager
from kvtier.tensors import KVLike, check_kv, copy_in, copy_in_run, copy_out, copy_out_run, plane_views

log = logging.getLogger(__name__)

STORE_GROUP_BYTES = 32 << 20  # store admits (and queues for write-back) this many bytes of chunks at a time
STAGE_BYTES = 64 << 20  # without promotion: scratch for lower-tier chunks not read straight into ``into``

#: ``sink(start, end, view)`` / ``source(start, end, view)`` of :meth:`CacheEngine.retrieve_to` /
#: :meth:`CacheEngine.store_from`: positions ``[start, end)`` of the tokens as a canonical chunk view
ChunkCall = Callable[[int, int, torch.Tensor], None]


class CacheEngine:
    """KV cache of one model (one :class:`KVSpec`) over a CPU tier and optional lower tiers."""

    def __init__(
        self,
        spec: KVSpec,
        model: str,
        config: KvtierConfig | None = None,
        *,
        tiers: Sequence[tuple[Tier, str]] | None = None,
    ) -> None:
        self.config = config or load_config()
        if spec.chunk_tokens != self.config.chunk_tokens:  # keys, slots and frames all depend on it
            raise ConfigError(
                f"chunk_tokens: the KV spec says {spec.chunk_tokens}, the config says {self.config.chunk_tokens}; "
                "build the spec with the config's chunk_tokens or set chunk_tokens in the config"
            )
        self.spec = spec
        self.namespace = Namespace(model=model, spec=spec, codec="raw", tenant=self.config.tenant)
        self.chunker = Chunker(self.namespace, partial=self.config.save_partial_chunks)
        self.cpu = CpuTier(spec, self.config.cpu.capacity, self.config.cpu.policy)
        if tiers is None:
            from kvtier.storage.factory import build_tiers

            tiers = build_tiers(self.config, spec)
        self.storage = StorageManager(spec, tiers, queue_depth=self.config.store_queue,
                                      auth=FrameKeys.from_config(self.config.auth))
        self.probe = NamespaceProbe(self.namespace, self.storage)  # namespace misses are counted, not silent
        # ``chunk_listener(tokens, chunks)`` before chunks of ``tokens`` enter the CPU tier (KV events)
        self.chunk_listeners: list[Callable[[np.ndarray, list[Chunk]], None]] = []
        self.counters: Counter[str] = Counter()
        # ``observer(op, seconds)`` after every lookup / store / retrieve (metrics); must not raise
        self.observers: list[Callable[[str, float], None]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self.counters.update(amounts)

    def _observe(self, op: str, start: float) -> None:
        for observer in self.observers:
            try:
                observer(op, time.perf_counter() - start)
            except Exception:
                log.debug("engine observer failed", exc_info=True)

    # ---- lookup ----------------------------------------------------------------------------------
    def _present(self, tokens: Tokens) -> tuple[np.ndarray, list[ChunkKey], list[int | None]]:
        """The token ids, their chunks' keys and, for the leading present run, where each chunk is
        (None = CPU)."""
        arr, keys, hashed = self.chunker.hashed(tokens)
        where: list[int | None] = [None] * self.cpu.leading_hits(keys, hashed)
        if len(where) < len(keys) and self.storage.enabled:
            where.extend(self.storage.locate(keys[len(where) :]))
        return arr, keys, where

    def lookup(self, tokens: Tokens) -> int:
        """Length of the cached, verified prefix of ``tokens``."""
        start = time.perf_counter()
        arr, _keys, where = self._present(tokens)
        hit = min(len(where) * self.chunker.chunk_tokens, len(arr))
        if hit == 0:
            self.probe.on_miss(arr)
        self._count(lookups=1, lookup_tokens=len(arr), lookup_hit_tokens=hit)
        self._observe("lookup", start)
        return hit

    # ---- store -----------------------------------------------------------------------------------
    def store(self, tokens: Tokens, kv: KVLike, *, skip_tokens: int = 0) -> int:
        """Cache the chunks of ``tokens`` from ``kv`` (positions ``[0, len(tokens))``).

        Chunks ending at or before ``skip_tokens`` are assumed cached by the caller and not copied.
        """
        start = time.perf_counter()
        arr, chunks = self.chunker.chunks(tokens)
        if chunks:
            check_kv(self.spec, kv, chunks[-1].end)
        # with lower tiers the write-back threads are sealing / sending the previous group meanwhile: a
        # multi-threaded copy_ would wait on the busy core
        return self._store(start, arr, chunks, skip_tokens,
                           lambda plan: self._move(plan, kv, into_arena=True, one_thread=self.storage.enabled))

    def store_from(self, tokens: Tokens, source: ChunkCall, *, skip_tokens: int = 0) -> int:
        """:meth:`store` with each chunk's reserved slot filled by ``source(start, end, view)`` (in order,
        see the module docstring) instead of copied from a tensor; ``skip_tokens`` as there."""
        start = time.perf_counter()
        arr, chunks = self.chunker.chunks(tokens)
        return self._store(start, arr, chunks, skip_tokens, self._per_chunk(source))

    def _per_chunk(self, call: ChunkCall) -> Callable[[Sequence[tuple[Chunk, int]]], None]:
        """A plan mover (as :meth:`_move`) that hands ``call`` each planned chunk's slot view in turn."""

        def each(plan: Sequence[tuple[Chunk, int]]) -> None:
            for chunk, slot in plan:
                call(chunk.start, chunk.end, self.cpu.arena.view(slot, chunk.num_tokens))

        return each

    def _store(self, start: float, arr: np.ndarray, chunks: list[Chunk], skip_tokens: int,
               fill_slots: Callable[[Sequence[tuple[Chunk, int]]], None]) -> int:
        """Admit the uncached ``chunks`` of ``arr``, group by group, ``fill_slots(plan)`` writing each
        group's ``(chunk, slot)`` plan; return the cached prefix length (see :meth:`store`)."""
        if not chunks:
            return 0
        todo = [(c, r) for c, r in zip(chunks, token_records(chunks, arr))  # each record built once
                if c.end > skip_tokens and not self.cpu.contains(r)]
        # with write-back, group by group so the write-back of one overlaps the copy of the next; without,
        # one group: every copy_ wakes torch's threads, and on a busy machine each wake-up costs (measured
        # 0.41x of copy_ in 32 MiB groups vs 0.91x in one, 8K SmolLM2 tokens, 2 shared cores)
        group = max(1, STORE_GROUP_BYTES // self.spec.chunk_bytes) if self.storage.enabled else len(todo)
        stored = done = 0
        held: list[int] = []  # this store's slots stay referenced to the end: a later group must not evict them
        try:
            while done < len(todo):
                part = [c for c, _r in todo[done : done + group]]
                records = [r for _c, r in todo[done : done + group]]

                def fill(slots: list[int], part: list[Chunk] = part) -> int:
                    fill_slots(list(zip(part, slots)))
                    for listener in self.chunk_listeners:
                        listener(arr, part[: len(slots)])
                    return len(slots)

                admitted = self.cpu.admit(records, fill, keep=True)
                for record, slot in zip(records, admitted):
                    if slot is None:  # stored meanwhile by another thread
                        continue
                    held.append(slot)
                    stored += record.num_tokens
                    if record.key == chunks[0].key:
                        self.probe.on_store(arr)
                    ref = self.cpu.acquire(record)  # the write-back's own reference
                    if ref is not None:
                        self._write_back(record, ref)
                done += len(admitted)
                if len(admitted) < len(part):
                    break
        finally:
            self._release(held)
        # the cached prefix ends before the first chunk no slot was free for
        cached = todo[done][0].start if done < len(todo) else chunks[-1].end
        self._count(stores=1, stored_tokens=stored, store_refused_tokens=len(arr) - cached)
        self._observe("store", start)
        return cached

    def _release(self, slots: Iterable[int | None]) -> None:
        for slot in slots:
            if slot is not None:
                self.cpu.release(slot)

    def _write_back(self, record: ChunkRecord, slot: int) -> None:
        """Queue the chunk in referenced ``slot`` for the lower tiers; the reference is released when
        the write is done (or at once without lower tiers)."""
        if not self.storage.enabled:
            self.cpu.release(slot)
            return
        view = self.cpu.arena.view(slot, record.num_tokens)
        self.storage.write_back(record, view, lambda: self.cpu.release(slot))

    def _move(self, plan: Sequence[tuple[Chunk, int]], kv: KVLike, *, into_arena: bool,
              one_thread: bool = False) -> None:
        """Copy each planned chunk between its arena slot and ``kv``; full chunks in consecutive slots
        move as one run (one copy instead of one per chunk). ``one_thread``: copy on the calling
        thread only (:func:`kvtier.tensors.copy_out`), for when other threads are busy with I/O."""
        c = self.spec.chunk_tokens
        i = 0
        while i < len(plan):
            chunk, slot = plan[i]
            count = 1
            if chunk.num_tokens == c:
                while (i + count < len(plan) and plan[i + count][1] == slot + count
                       and plan[i + count][0].num_tokens == c and plan[i + count][0].start == chunk.start + count * c):
                    count += 1
            if count == 1:
                view = self.cpu.arena.view(slot, chunk.num_tokens)
                (copy_in if into_arena else copy_out)(view, kv, chunk.start, chunk.end, one_thread=one_thread)
            else:
                run = self.cpu.arena.buffer[slot : slot + count]
                (copy_in_run if into_arena else copy_out_run)(run, kv, chunk.start, one_thread=one_thread)
            i += count

    # ---- retrieve --------------------------------------------------------------------------------
    def _acquire(self, arr: np.ndarray, keys: list[ChunkKey], where: list[int | None], *,
                 cpu: Callable[[Sequence[tuple[Chunk, int]]], None] | None = None, out: ChunkCall | None = None,
                 planes: list[memoryview] | None = None) -> tuple[int, list[tuple[Chunk, int | None]]]:
        """Hold the cached prefix (``arr``, ``keys``, ``where`` from :meth:`_present`) in CPU, promoting
        lower-tier hits, or with promotion off reading them for this call only into ``out`` (then
        required; ``planes``: a destination's plane views for reads straight into it).

        The CPU hits are a prefix of the hit (``where`` starts with their ``None``): ``cpu(plan)``, if given,
        gets their ``(chunk, slot)`` plan before any lower tier is read. ``out(start, end, view)``, if
        given, gets each lower-tier chunk as soon as it verified, while the next ones are still being
        read; those come back with slot ``None``. Returns the hit length and, per hit chunk, its CPU
        slot (referenced: :meth:`_release` them). On an exception, a callback's included, every slot
        is released and nothing read is admitted."""
        n = len(where)
        chunks = self.chunker.chunks_of(arr, keys[:n])
        records = token_records(chunks, arr)
        held: list[int | None] = [None] * n
        for i in range(n):  # CPU hits first, so reserving slots for lower-tier hits cannot evict them
            if where[i] is None:
                held[i] = self.cpu.acquire(records[i])
                if held[i] is None:
                    n = i
                    break
        lower = [i for i in range(n) if where[i] is not None]
        try:
            if cpu is not None:
                cpu([(chunks[i], cast(int, held[i])) for i in range(n) if where[i] is None])
            if lower and self.config.cpu.promote:
                n = self._promote(lower, where, records, chunks, held, out, n, arr)
            elif lower:
                assert out is not None, "without promotion lower-tier hits need a destination"
                n = self._read_through(lower, where, records, chunks, out, planes, n)
        except BaseException:
            self._release(held)
            raise
        self._release(held[n:])
        hit = chunks[n - 1].end if n else 0
        return hit, [(chunks[i], held[i]) for i in range(n)]

    def _promote(self, lower: list[int], where: list[int | None], records: list[ChunkRecord],
                 chunks: list[Chunk], held: list[int | None], out: ChunkCall | None, n: int,
                 arr: np.ndarray) -> int:
        """Admit the lower-tier hits ``lower`` into CPU through one pipelined read (handing each to
        ``out`` as it is verified); fill ``held``; return the new hit length in chunks."""

        def fill(slots: list[int]) -> int:
            loads = [Load(cast(int, where[i]), records[i], self.cpu.arena.view(slot, records[i].num_tokens))
                     for i, slot in zip(lower, slots)]
            reads = self.storage.load_many(loads)
            done = 0
            try:
                for ok in reads:
                    if not ok:
                        break
                    for listener in self.chunk_listeners:  # a promotion admits it to the CPU tier
                        listener(arr, [chunks[lower[done]]])
                    if out is not None:
                        chunk = chunks[lower[done]]
                        out(chunk.start, chunk.end, loads[done].out)
                    done += 1
            finally:
                reads.close()  # no read may still target a slot the admission gives back
            return done

        admitted = self.cpu.admit([records[i] for i in lower], fill, keep=True)
        self._count(promoted_chunks=len(admitted))
        for i, slot in zip(lower, admitted):
            if out is not None:  # handed out while reading: nothing left to hold
                if slot is not None:
                    self.cpu.release(slot)
                continue
            if slot is None:  # indexed meanwhile by another thread: hold that entry instead
                slot = self.cpu.acquire(records[i])
                if slot is None:
                    return i
            held[i] = slot
        return lower[len(admitted)] if len(admitted) < len(lower) else n

    def _read_through(self, lower: list[int], where: list[int | None], records: list[ChunkRecord],
                      chunks: list[Chunk], out: ChunkCall, planes: list[memoryview] | None, n: int) -> int:
        """Read the lower-tier hits ``lower`` for this retrieve only (promotion off): straight into
        ``planes`` (the destination's per-layer K and V rows) where the tier and ``planes`` allow it,
        else through scratch buffers of at most ``STAGE_BYTES`` at a time, handed to ``out`` as each
        chunk is verified. Return the new hit length in chunks."""
        row = self.spec.bytes_per_token // (2 * self.spec.num_layers)  # bytes of one position of one plane

        def direct(i: int) -> bool:
            return planes is not None and self.storage.slots[cast(int, where[i])].reads_scattered

        def staged_bytes(i: int) -> int:
            return 0 if direct(i) else records[i].num_tokens * self.spec.bytes_per_token

        segments = list(batching.cut(lower, len(lower), STAGE_BYTES, staged_bytes))
        # one scratch for every segment (each is done with it before the next starts), allocated once
        scratch = torch.empty(max(sum(staged_bytes(i) for i in segment) for segment in segments)
                              // self.spec.itemsize, dtype=self.spec.torch_dtype)
        for segment in segments:
            loads, at = [], 0
            for i in segment:
                chunk, shape = chunks[i], self.spec.chunk_shape(chunks[i].num_tokens)
                if planes is not None and direct(i):
                    parts = [plane[chunk.start * row : chunk.end * row] for plane in planes]
                    meta = torch.empty(shape, dtype=self.spec.torch_dtype, device="meta")  # the shape only
                    loads.append(Load(cast(int, where[i]), records[i], meta, parts))
                else:
                    size = staged_bytes(i) // self.spec.itemsize
                    loads.append(Load(cast(int, where[i]), records[i], scratch[at : at + size].view(shape)))
                    at += size
            done = 0
            reads = self.storage.load_many(loads)
            try:
                for ok in reads:
                    if not ok:
                        break
                    if loads[done].into is None:
                        chunk = chunks[segment[done]]
                        out(chunk.start, chunk.end, loads[done].out)
                    done += 1
            finally:
                reads.close()  # nothing may still write into ``planes`` or the scratch
            direct_done = sum(loads[j].into is not None for j in range(done))
            self._count(direct_chunks=direct_done, staged_chunks=done - direct_done)
            if done < len(segment):
                return segment[done]
        return n

    def retrieve(self, tokens: Tokens, into: KVLike) -> int:
        """Write the cached prefix of ``tokens`` into ``into``; return its length (see the module
        docstring for which positions may have been written)."""
        return self._timed_retrieve(tokens, lambda arr, keys, where: self._retrieve(arr, keys, where, into))

    def retrieve_to(self, tokens: Tokens, sink: ChunkCall) -> int:
        """Hand each verified chunk of the cached prefix of ``tokens`` to ``sink(start, end, view)``, in
        order; return the prefix's length (see the module docstring). Nothing outside the hit reaches
        ``sink``."""

        def run(arr: np.ndarray, keys: list[ChunkKey], where: list[int | None]) -> int:
            hit, held = self._acquire(arr, keys, where, cpu=self._per_chunk(sink), out=sink)
            self._release(slot for _c, slot in held)
            return hit

        return self._timed_retrieve(tokens, run)

    def _timed_retrieve(self, tokens: Tokens,
                        run: Callable[[np.ndarray, list[ChunkKey], list[int | None]], int]) -> int:
        start = time.perf_counter()
        arr, keys, where = self._present(tokens)
        hit = run(arr, keys, where)
        self._count(retrieves=1, retrieve_tokens=len(arr), retrieve_hit_tokens=hit)
        self._observe("retrieve", start)
        return hit

    def _hit_bound(self, arr: np.ndarray, where: list[int | None]) -> int:
        """The hit length of ``where`` (from :meth:`_present`) if every present chunk arrives intact."""
        return min(len(where) * self.chunker.chunk_tokens, len(arr))

    def _retrieve(self, arr: np.ndarray, keys: list[ChunkKey], where: list[int | None], into: KVLike) -> int:
        span = self._hit_bound(arr, where)
        if span:
            check_kv(self.spec, into, span)

        def copy(start: int, end: int, view: torch.Tensor) -> None:
            copy_out(view, into, start, end, one_thread=True)

        hit, held = self._acquire(arr, keys, where, cpu=lambda plan: self._move(plan, into, into_arena=False),
                                  out=copy, planes=plane_views(into))
        self._release(slot for _c, slot in held)
        return hit

    # ---- frames (cluster agent) ------------------------------------------------------------------
    def admit_frame(self, record: ChunkRecord, frame: bytes | memoryview) -> str:
        """Verify wire ``frame`` (e.g. from a peer) against ``record`` and admit it to the CPU tier.
        Returns ``"fetched"``, ``"present"`` (already cached), ``"full"`` (no slot free),
        ``"mismatch"`` (a valid frame of another chunk) or ``"corrupt"``."""
        if self.cpu.contains(record):
            return "present"
        outcome = "full"

        def fill(slots: list[int]) -> int:
            nonlocal outcome
            if not slots:
                return 0
            view = self.cpu.arena.view(slots[0], record.num_tokens)
            try:
                meta = frames.unpack_into(frame, self.spec, view, record.key, self.storage.auth)
            except KvtierError:
                outcome = "corrupt"
                return 0
            outcome = "fetched" if verify(meta.record(), record) else "mismatch"
            return int(outcome == "fetched")

        admitted = self.cpu.admit([record], fill)
        return "present" if admitted == [None] else outcome

    def encode_chunk(self, record: ChunkRecord, codec: str) -> bytes | None:
        """The chunk of ``record`` as a wire frame encoded with ``codec`` (and the engine's keyring):
        from the CPU tier if there, else read and verified from the first lower tier holding it;
        ``None`` if no tier has it."""
        slot = self.cpu.acquire(record)
        if slot is not None:
            try:
                return frames.pack(record, self.cpu.arena.view(slot, record.num_tokens), self.spec, codec,
                                   self.storage.auth)
            finally:
                self.cpu.release(slot)
        where = self.storage.locate([record.key])
        scratch = torch.empty(self.spec.chunk_shape(record.num_tokens), dtype=self.spec.torch_dtype)
        if not where or not self.storage.load(where[0], record, scratch):
            return None
        return frames.pack(record, scratch, self.spec, codec, self.storage.auth)

    # ---- layerwise -------------------------------------------------------------------------------
    @contextmanager
    def layerwise_store(self, tokens: Tokens, *, skip_tokens: int = 0) -> Iterator[LayerwiseStore]:
        """Reserve slots for the uncached chunks of ``tokens``; fill them with ``.layer(l, k, v)`` for
        every layer; they are committed when the block exits without error (aborted otherwise)."""
        writer = LayerwiseStore(self, tokens, skip_tokens)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.finish()

    @contextmanager
    def layerwise_retrieve(self, tokens: Tokens) -> Iterator[LayerwiseRetrieve]:
        """Hold the cached prefix of ``tokens``; copy it out with ``.layer(l, k, v)`` per layer."""
        reader = LayerwiseRetrieve(self, tokens)
        try:
            yield reader
        finally:
            reader.close()

    # ---- management ------------------------------------------------------------------------------
    def _keyed_prefix(self, tokens: Tokens) -> list[Chunk]:
        arr, chunks = self.chunker.chunks(tokens)
        return [c for c in chunks if self.cpu.contains(token_record(c, arr))]

    def pin(self, tokens: Tokens) -> int:
        """Pin the CPU-resident chunks of ``tokens`` (they survive eviction); return tokens pinned."""
        return sum(c.num_tokens for c in self._keyed_prefix(tokens) if self.cpu.pin(c.key))

    def unpin(self, tokens: Tokens) -> int:
        return sum(c.num_tokens for c in self._keyed_prefix(tokens) if self.cpu.unpin(c.key))

    def remove(self, tokens: Tokens) -> int:
        """Remove every chunk of ``tokens`` from every tier; return chunks removed (any tier)."""
        _arr, chunks = self.chunker.chunks(tokens)
        return sum(int(self.cpu.remove(c.key)) + self.storage.delete(c.key) for c in chunks)

    def clear(self) -> int:
        """Drop every unpinned, unused chunk from every tier; return how many were dropped."""
        return self.cpu.clear() + self.storage.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            engine = dict(self.counters)
        cpu: dict[str, int | float] = dict(self.cpu.counters)
        cpu.update(
            chunks=len(self.cpu),
            used_bytes=self.cpu.used_bytes,
            capacity_bytes=self.cpu.arena.capacity_bytes,
        )
        engine.update(self.probe.counters)
        return {"engine": engine, "cpu": cpu, **self.storage.stats()}

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush lower-tier writes (bounded by ``timeout_s``) and stop; return writes lost."""
        if self._closed:
            return 0
        self._closed = True
        self.probe.flush(min(timeout_s, 5.0))
        lost = self.storage.close(timeout_s)
        if lost:
            log.warning("kvtier closed with %d chunk writes not flushed", lost)
        return lost

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayerwiseStore:
    """Per-layer writer created by :meth:`CacheEngine.layerwise_store`: one CPU-tier admission whose
    fill is the caller's ``layer`` calls."""

    def __init__(self, engine: CacheEngine, tokens: Tokens, skip_tokens: int) -> None:
        self._engine = engine
        arr, chunks = engine.chunker.chunks(tokens)
        self._arr = arr
        self._first_key = chunks[0].key if chunks else None
        todo = [c for c in chunks if c.end > skip_tokens and not engine.cpu.contains(token_record(c, arr))]
        self._admission = engine.cpu.reserve([token_record(c, arr) for c in todo])
        self._chunks = todo[: len(self._admission)]
        # the cached prefix ends before the first chunk no slot was free for
        complete = len(self._chunks) == len(todo)
        self.cached = todo[len(self._chunks)].start if not complete else (chunks[-1].end if chunks else 0)
        self._layers_done: set[int] = set()

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy layer ``layer`` (``k``, ``v`` shaped ``[tokens, kv_heads, head_dim]``) into the slots."""
        for i, chunk in enumerate(self._chunks):
            view = self._admission.view(i)
            view[layer, 0].copy_(k[chunk.start : chunk.end])
            view[layer, 1].copy_(v[chunk.start : chunk.end])
        self._layers_done.add(layer)

    def finish(self) -> int:
        """Commit every chunk (all layers must have been written); return the cached prefix length."""
        missing = set(range(self._engine.spec.num_layers)) - self._layers_done
        if missing and self._chunks:
            self.abort()
            raise ValueError(f"layerwise store finished without layers {sorted(missing)}")
        engine = self._engine
        for listener in engine.chunk_listeners:  # as store's fill: the chunks are about to be admitted
            listener(self._arr, self._chunks)
        stored = 0
        for record, slot in zip(self._admission.records, self._admission.commit(len(self._admission))):
            if slot is not None:
                stored += record.num_tokens
                if record.key == self._first_key:
                    engine.probe.on_store(self._arr)
                engine._write_back(record, slot)
        engine._count(stores=1, stored_tokens=stored)
        return self.cached

    def abort(self) -> None:
        self._admission.abort()


class LayerwiseRetrieve:
    """Per-layer reader created by :meth:`CacheEngine.layerwise_retrieve`. ``hit_tokens`` is fixed at
    creation; the slots stay referenced until the block exits."""

    def __init__(self, engine: CacheEngine, tokens: Tokens) -> None:
        self._engine = engine
        arr, keys, where = engine._present(tokens)
        self._chunks: list[Chunk] = []
        self._slots: list[int] = []
        # without promotion the prefix is read once into a canonical KV of its own (dropped at close)
        self._kv: torch.Tensor | None = None
        if engine.config.cpu.promote:
            self.hit_tokens, held = engine._acquire(arr, keys, where)
            self._chunks = [chunk for chunk, _slot in held]
            self._slots = [cast(int, slot) for _chunk, slot in held]  # without ``into`` every slot is held
        else:
            shape = engine.spec.chunk_shape(engine._hit_bound(arr, where))
            self._kv = torch.empty(shape, dtype=engine.spec.torch_dtype)
            self.hit_tokens = engine._retrieve(arr, keys, where, self._kv)
        engine._count(retrieves=1, retrieve_tokens=len(arr), retrieve_hit_tokens=self.hit_tokens)

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write layer ``layer`` of the hit prefix into ``k``, ``v`` (``[tokens, kv_heads, head_dim]``)."""
        if self._kv is not None:
            k[: self.hit_tokens].copy_(self._kv[layer, 0, : self.hit_tokens])
            v[: self.hit_tokens].copy_(self._kv[layer, 1, : self.hit_tokens])
        for chunk, slot in zip(self._chunks, self._slots):
            view = self._engine.cpu.arena.view(slot, chunk.num_tokens)
            k[chunk.start : chunk.end].copy_(view[layer, 0])
            v[chunk.start : chunk.end].copy_(view[layer, 1])

    def close(self) -> None:
        for slot in self._slots:
            self._engine.cpu.release(slot)
        self._slots = []
        self._chunks = []
        self._kv = None
