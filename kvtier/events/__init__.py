"""KV events in vLLM's format: what kvtier stores and evicts, per tier, as vLLM KV-event batches.

- :mod:`.hashing` — block hashes exactly as vLLM's prefix cache computes them.
- :mod:`.schema` — the event records (the same msgpack encoding as ``vllm.distributed.kv_events``).
- :mod:`.publisher` — ZMQ PUB stream + ROUTER replay with vLLM's conventions.
- :mod:`.bridge` — turns a :class:`~kvtier.engine.CacheEngine`'s stores, promotions, evictions and
  lower-tier writes into events.
"""

from __future__ import annotations

from kvtier.events.bridge import EventBridge
from kvtier.events.hashing import BlockHasher

__all__ = ["BlockHasher", "EventBridge"]
