"""CacheEngine: the public API engines call.

Semantics (all methods are thread-safe):
- ``lookup(tokens)`` -> number of leading tokens whose chunks are all present (CPU or a lower tier) and
  verified against ``tokens``. A full hit ending in a stored partial chunk returns ``len(tokens)``.
- ``store(tokens, kv)`` copies the chunks of ``tokens`` not yet cached out of ``kv`` into CPU slots
  and returns once the copy is done; writes to lower tiers continue in the background through a
  bounded queue. Returns the length of the cached prefix after the call (a refused chunk stops it).
- ``retrieve(tokens, into)`` writes the longest cached prefix into ``into`` and returns its length;
  exactly positions ``[0, hit)`` were written, nothing else. Lower-tier hits are promoted to CPU.
- ``prefetch(tokens)`` promotes lower-tier chunks to CPU in the background.
- ``layerwise_store`` / ``layerwise_retrieve`` do the same one layer at a time so an engine can overlap
  transfers with compute.
- Nothing here raises because a tier failed: a failed tier is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from kvtier.config import KvtierConfig, load_config
from kvtier.frame_auth import FrameKeys
from kvtier.keys import Chunk, Chunker, Namespace, Tokens
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord, token_record
from kvtier.storage.base import Tier
from kvtier.storage.cpu import CpuTier
from kvtier.storage.manager import StorageManager
from kvtier.tensors import KVLike, check_kv, copy_in, copy_in_run, copy_out, copy_out_run

log = logging.getLogger(__name__)


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
        if spec.chunk_tokens != self.config.chunk_tokens:
            spec = KVSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype, self.config.chunk_tokens)
        self.spec = spec
        self.namespace = Namespace(model=model, spec=spec, codec="raw", tenant=self.config.tenant)
        self.chunker = Chunker(self.namespace, partial=self.config.save_partial_chunks)
        self.cpu = CpuTier(spec, self.config.cpu.capacity, self.config.cpu.policy)
        if tiers is None:
            from kvtier.storage.factory import build_tiers

            tiers = build_tiers(self.config, spec)
        self.storage = StorageManager(spec, tiers, queue_depth=self.config.store_queue,
                                      auth=FrameKeys.from_config(self.config.auth))
        self.counters: Counter[str] = Counter()
        # ``observer(op, seconds)`` after every lookup / store / retrieve (metrics); must not raise
        self.observers: list[Callable[[str, float], None]] = []
        self._lock = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-prefetch")
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
    def _present(self, tokens: Tokens) -> tuple[np.ndarray, list[Chunk], list[int | None]]:
        """Chunks of ``tokens`` and, for the leading present run, where each is (None = CPU)."""
        arr, chunks = self.chunker.chunks(tokens)
        where: list[int | None] = [None] * self.cpu.leading_hits(chunks, arr)
        if len(where) < len(chunks) and self.storage.enabled:
            where.extend(self.storage.locate([c.key for c in chunks[len(where) :]]))
        return arr, chunks, where

    def lookup(self, tokens: Tokens) -> int:
        """Length of the cached, verified prefix of ``tokens``."""
        start = time.perf_counter()
        _arr, chunks, where = self._present(tokens)
        hit = chunks[len(where) - 1].end if where else 0
        self._count(lookups=1, lookup_tokens=len(_arr), lookup_hit_tokens=hit)
        self._observe("lookup", start)
        return hit

    # ---- store -----------------------------------------------------------------------------------
    def store(self, tokens: Tokens, kv: KVLike, *, skip_tokens: int = 0) -> int:
        """Cache the chunks of ``tokens`` from ``kv`` (positions ``[0, len(tokens))``).

        Chunks ending at or before ``skip_tokens`` are assumed cached by the caller and not copied.
        """
        start = time.perf_counter()
        arr, chunks = self.chunker.chunks(tokens)
        if not chunks:
            return 0
        check_kv(self.spec, kv, chunks[-1].end)
        cached = 0
        plan: list[tuple[Chunk, int]] = []  # chunks to copy, each with its reserved (referenced) slot
        for chunk in chunks:
            if chunk.end <= skip_tokens or self.cpu.contains(token_record(chunk, arr)):
                cached = chunk.end
                continue
            slot = self.cpu.reserve()
            if slot is None:
                break
            plan.append((chunk, slot))
            cached = chunk.end
        try:
            self._move(plan, kv, into_arena=True)
        except BaseException:
            for _chunk, slot in plan:
                self.cpu.abort(slot)
            raise
        stored = 0
        for chunk, slot in plan:
            if self.cpu.commit(token_record(chunk, arr), slot):
                stored += chunk.num_tokens
                self._write_back(chunk, arr)
        self._count(stores=1, stored_tokens=stored, store_refused_tokens=len(arr) - cached)
        self._observe("store", start)
        return cached

    def _write_back(self, chunk: Chunk, arr: np.ndarray) -> None:
        if not self.storage.enabled:
            return
        record = token_record(chunk, arr)
        slot = self.cpu.acquire(record)
        if slot is None:
            return
        view = self.cpu.arena.view(slot, chunk.num_tokens)
        self.storage.write_back(record, view, lambda: self.cpu.release(slot))

    def _move(self, plan: Sequence[tuple[Chunk, int]], kv: KVLike, *, into_arena: bool) -> None:
        """Copy each planned chunk between its arena slot and ``kv``; full chunks in consecutive slots
        move as one run (one ``copy_`` instead of one per chunk)."""
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
                (copy_in if into_arena else copy_out)(view, kv, chunk.start, chunk.end)
            else:
                run = self.cpu.arena.buffer[slot : slot + count]
                (copy_in_run if into_arena else copy_out_run)(run, kv, chunk.start)
            i += count

    # ---- retrieve --------------------------------------------------------------------------------
    def _acquire_all(self, tokens: Tokens) -> tuple[np.ndarray, list[Chunk], list[int]]:
        """Reference the CPU slots of the leading present run, promoting lower-tier hits to CPU."""
        arr, chunks, where = self._present(tokens)
        slots: list[int] = []
        for chunk, tier in zip(chunks, where):
            record = token_record(chunk, arr)
            slot = self.cpu.acquire(record) if tier is None else self._promote(tier, record)
            if slot is None:
                break
            slots.append(slot)
        return arr, chunks[: len(slots)], slots

    def _promote(self, tier: int, record: ChunkRecord) -> int | None:
        """Load ``record`` from lower tier ``tier`` into a CPU slot; the slot comes back referenced."""
        slot = self.cpu.reserve()
        if slot is None:
            return None
        if not self.storage.load(tier, record, self.cpu.arena.view(slot, record.num_tokens)):
            self.cpu.abort(slot)
            return None
        self._count(promoted_chunks=1)
        self.cpu.commit(record, slot)  # False: someone else promoted it meanwhile; acquire theirs
        return self.cpu.acquire(record)

    def retrieve(self, tokens: Tokens, into: KVLike) -> int:
        """Write the cached prefix of ``tokens`` into ``into``; return its length."""
        start = time.perf_counter()
        arr, chunks, slots = self._acquire_all(tokens)
        try:
            if chunks:
                check_kv(self.spec, into, chunks[-1].end)
            self._move(list(zip(chunks, slots)), into, into_arena=False)
        finally:
            for slot in slots:
                self.cpu.release(slot)
        hit = chunks[-1].end if chunks else 0
        self._count(retrieves=1, retrieve_tokens=len(arr), retrieve_hit_tokens=hit)
        self._observe("retrieve", start)
        return hit

    def prefetch(self, tokens: Tokens) -> Future[int]:
        """Promote the lower-tier part of the cached prefix of ``tokens`` to CPU in the background.

        The future resolves to the number of tokens then in CPU.
        """

        def run() -> int:
            _arr, chunks, slots = self._acquire_all(tokens)
            for slot in slots:
                self.cpu.release(slot)
            return chunks[-1].end if chunks else 0

        return self._prefetcher.submit(run)

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
        return {"engine": engine, "cpu": cpu, **self.storage.stats()}

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush lower-tier writes (bounded by ``timeout_s``) and stop; return writes lost."""
        if self._closed:
            return 0
        self._closed = True
        self._prefetcher.shutdown(wait=True)
        lost = self.storage.close(timeout_s)
        if lost:
            log.warning("kvtier closed with %d chunk writes not flushed", lost)
        return lost

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayerwiseStore:
    """Per-layer writer created by :meth:`CacheEngine.layerwise_store`."""

    def __init__(self, engine: CacheEngine, tokens: Tokens, skip_tokens: int) -> None:
        self._engine = engine
        self._arr, chunks = engine.chunker.chunks(tokens)
        self._pending: list[tuple[Chunk, int]] = []
        self.cached = 0
        for chunk in chunks:
            if chunk.end <= skip_tokens or engine.cpu.contains(token_record(chunk, self._arr)):
                self.cached = chunk.end
                continue
            slot = engine.cpu.reserve()
            if slot is None:
                break
            self._pending.append((chunk, slot))
            self.cached = chunk.end
        self._layers_done: set[int] = set()

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy layer ``layer`` (``k``, ``v`` shaped ``[tokens, kv_heads, head_dim]``) into the slots."""
        for chunk, slot in self._pending:
            view = self._engine.cpu.arena.view(slot, chunk.num_tokens)
            view[layer, 0].copy_(k[chunk.start : chunk.end])
            view[layer, 1].copy_(v[chunk.start : chunk.end])
        self._layers_done.add(layer)

    def finish(self) -> int:
        """Commit every chunk (all layers must have been written); return the cached prefix length."""
        missing = set(range(self._engine.spec.num_layers)) - self._layers_done
        if missing and self._pending:
            self.abort()
            raise ValueError(f"layerwise store finished without layers {sorted(missing)}")
        stored = 0
        for chunk, slot in self._pending:
            if self._engine.cpu.commit(token_record(chunk, self._arr), slot):
                stored += chunk.num_tokens
                self._engine._write_back(chunk, self._arr)
        self._pending = []
        self._engine._count(stores=1, stored_tokens=stored)
        return self.cached

    def abort(self) -> None:
        for _chunk, slot in self._pending:
            self._engine.cpu.abort(slot)
        self._pending = []


class LayerwiseRetrieve:
    """Per-layer reader created by :meth:`CacheEngine.layerwise_retrieve`. ``hit_tokens`` is fixed at
    creation; the slots stay referenced until the block exits."""

    def __init__(self, engine: CacheEngine, tokens: Tokens) -> None:
        self._engine = engine
        arr, self._chunks, self._slots = engine._acquire_all(tokens)
        self.hit_tokens = self._chunks[-1].end if self._chunks else 0
        engine._count(retrieves=1, retrieve_tokens=len(arr), retrieve_hit_tokens=self.hit_tokens)

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write layer ``layer`` of the hit prefix into ``k``, ``v`` (``[tokens, kv_heads, head_dim]``)."""
        for chunk, slot in zip(self._chunks, self._slots):
            view = self._engine.cpu.arena.view(slot, chunk.num_tokens)
            k[chunk.start : chunk.end].copy_(view[layer, 0])
            v[chunk.start : chunk.end].copy_(view[layer, 1])

    def close(self) -> None:
        for slot in self._slots:
            self._engine.cpu.release(slot)
        self._slots = []
        self._chunks = []
