"""KV-event records with the msgpack encoding of vLLM's ``vllm.distributed.kv_events``.

A batch is the array ``[ts, events, data_parallel_rank]``; each event is a map tagged with its class
name (``"type"``: ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``), fields with default values
omitted. A consumer that decodes vLLM's ``KVEventBatch`` decodes these unchanged (the real-vLLM test does
exactly that). ``medium`` names where the blocks are: kvtier uses ``"kvtier/<tier>"`` (``kvtier/cpu``,
``kvtier/disk``, ``kvtier/redis`` ...), vLLM itself ``GPU`` / ``CPU`` / ``STORAGE``.
"""

from __future__ import annotations

import msgspec

from kvtier.events.hashing import ExternalHash

MEDIUM_PREFIX = "kvtier/"


class KVCacheEvent(msgspec.Struct, omit_defaults=True, tag=True):
    """Base of the tagged event records."""


class BlockStored(KVCacheEvent):
    """Full blocks now held by ``medium``: ``block_hashes`` in order, chained to ``parent_block_hash``
    (``None``: the first block of a sequence), covering ``token_ids`` (``block_size`` per block)."""

    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    locality: str | None = None
    ownership: str | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks ``medium`` no longer holds."""

    block_hashes: list[ExternalHash]
    medium: str | None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """Every block of the publisher is gone."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    """One published message: a timestamp, events in order, the data-parallel rank."""

    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


def medium(tier: str) -> str:
    """The ``medium`` of kvtier tier ``tier``."""
    return MEDIUM_PREFIX + tier
