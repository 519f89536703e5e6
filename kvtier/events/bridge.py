"""Turns one :class:`~kvtier.engine.CacheEngine`'s activity into vLLM KV events (per tier).

- A chunk about to enter the CPU tier (a store, or a promotion from a lower tier) is described once:
  the vLLM block hashes of its full blocks (:class:`~kvtier.events.hashing.BlockHasher`), chained from
  the previous chunk's last block, and its token ids; kept in a bounded map key -> description.
- CPU-tier ``admit`` -> ``BlockStored(medium="kvtier/cpu")``, ``evict`` -> ``BlockRemoved``.
- A lower-tier write that succeeded -> ``BlockStored(medium="kvtier/<tier>")``. (Evictions inside lower
  tiers are not observable yet and are not published.)

Invariants: a chunk whose boundaries are not block boundaries publishes only the blocks it fully
contains, so ``chunk_tokens`` should be a multiple of vLLM's ``block_size`` (the vLLM connector's
default is). Every callback only appends to a bounded queue (the CPU tier calls with its lock held);
hashing happens on the caller's thread before the chunk is committed. An exception here is logged and
never reaches the engine.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.events.hashing import BlockHasher
from kvtier.events.publisher import ZmqPublisher
from kvtier.events.schema import BlockRemoved, BlockStored, Event, medium
from kvtier.keys import Chunk, ChunkKey

if TYPE_CHECKING:
    from kvtier.config import EventsConfig
    from kvtier.engine import CacheEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Described:
    hashes: list[bytes]  # raw vLLM block hashes of the chunk's full blocks
    parent: bytes | None  # hash of the block before the chunk (None: first block of the sequence)
    tokens: bytes  # uint32-le ids of those blocks


class EventBridge:
    """Publishes the events of one engine; :meth:`attach` hooks it in, :meth:`close` unhooks."""

    def __init__(self, hasher: BlockHasher, publisher: ZmqPublisher, *, max_chunks: int = 65_536) -> None:
        self.hasher = hasher
        self.publisher = publisher
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[ChunkKey, _Described] = OrderedDict()
        self._lock = threading.Lock()
        self._engine: CacheEngine | None = None

    # ---- description (caller's thread, before the CPU commit) -------------------------------------
    def describe(self, tokens: np.ndarray, chunks: list[Chunk]) -> None:
        """Compute and remember the block hashes of ``chunks`` of ``tokens`` (in order)."""
        try:
            for chunk in chunks:
                self._describe(tokens, chunk)
        except Exception:
            log.exception("describing chunks for KV events failed")

    def _describe(self, tokens: np.ndarray, chunk: Chunk) -> None:
        bs = self.hasher.block_size
        with self._lock:
            if chunk.key in self._chunks:
                self._chunks.move_to_end(chunk.key)
                return
            before = self._chunks.get(chunk.parent) if chunk.number else None
        first = -(-chunk.start // bs)  # first block fully inside the chunk
        last = chunk.end // bs
        if first >= last:
            return
        if chunk.number == 0 or first == 0:
            parent: bytes | None = None
        elif before is not None and before.hashes and chunk.start % bs == 0:
            parent = before.hashes[-1]
        else:  # the previous chunk's description is gone: hash the prefix again
            prefix = self.hasher.chain(None, tokens[: first * bs].tolist())
            parent = prefix[-1] if prefix else None
        block_tokens = tokens[first * bs : last * bs]
        described = _Described(self.hasher.chain(parent, block_tokens.tolist()), parent,
                               block_tokens.astype("<u4").tobytes())
        with self._lock:
            self._chunks[chunk.key] = described
            while len(self._chunks) > self.max_chunks:
                self._chunks.popitem(last=False)

    # ---- engine callbacks (must not block) ---------------------------------------------------------
    def _stored(self, key: ChunkKey, tier: str) -> Event | None:
        with self._lock:
            d = self._chunks.get(key)
        if d is None:
            return None
        ext = self.hasher.external
        return BlockStored(block_hashes=[ext(h) for h in d.hashes],
                           parent_block_hash=None if d.parent is None else ext(d.parent),
                           token_ids=np.frombuffer(d.tokens, dtype="<u4").tolist(),
                           block_size=self.hasher.block_size, lora_id=None, medium=medium(tier), lora_name=None,
                           locality="LOCAL", ownership="kvtier")

    def _removed(self, key: ChunkKey, tier: str) -> Event | None:
        with self._lock:
            d = self._chunks.get(key)
        if d is None:
            return None
        return BlockRemoved(block_hashes=[self.hasher.external(h) for h in d.hashes], medium=medium(tier),
                            locality="LOCAL", ownership="kvtier")

    def on_cpu(self, kind: str, key: ChunkKey) -> None:
        """CPU-tier listener: ``admit`` / ``evict`` of ``key``."""
        event = self._stored(key, "cpu") if kind == "admit" else self._removed(key, "cpu")
        if event is not None:
            self.publisher.publish([event])

    def on_put(self, tier: str, key: ChunkKey) -> None:
        """Lower-tier listener: ``key`` was written to ``tier``."""
        event = self._stored(key, tier)
        if event is not None:
            self.publisher.publish([event])

    # ---- lifecycle ------------------------------------------------------------------------------------
    def attach(self, engine: CacheEngine) -> None:
        """Hook into ``engine``: chunk descriptions, CPU listener, lower-tier writes."""
        engine.chunk_listeners.append(self.describe)
        engine.cpu.listeners.append(self.on_cpu)
        engine.storage.put_listeners.append(self.on_put)
        self._engine = engine

    def close(self) -> None:
        """Unhook from the engine, send what is queued, close the sockets."""
        engine = self._engine
        if engine is not None:
            hooks: list[tuple[list[Any], Any]] = [(engine.chunk_listeners, self.describe),
                                                  (engine.cpu.listeners, self.on_cpu),
                                                  (engine.storage.put_listeners, self.on_put)]
            for listeners, fn in hooks:
                if fn in listeners:
                    listeners.remove(fn)
            self._engine = None
        self.publisher.close()


def start_events(engine: CacheEngine, config: EventsConfig, hasher: BlockHasher) -> EventBridge:
    """Bind a publisher for ``config`` and attach a bridge to ``engine``."""
    publisher = ZmqPublisher(config.endpoint, config.replay_endpoint or None, topic=config.topic,
                             buffer_steps=config.buffer_steps, max_queue=config.max_queue,
                             allow_remote=config.allow_remote)
    bridge = EventBridge(hasher, publisher, max_chunks=config.max_chunks)
    bridge.attach(engine)
    return bridge
