"""kvtier's KV events without vLLM: real ZMQ sockets on loopback, a real engine with a disk tier.

What a vLLM-schema subscriber needs: (topic, seq, payload) messages, msgpack batches of tagged events,
replay from a sequence number over the ROUTER socket ending with seq -1; stores and evictions per tier.
The hash equality with a real vLLM is in tests/integrations/test_vllm_events.py.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

zmq = pytest.importorskip("zmq")

from kvtier.config import EventsConfig, load_config  # noqa: E402
from kvtier.engine import CacheEngine  # noqa: E402
from kvtier.errors import ConfigError  # noqa: E402
from kvtier.events.bridge import start_events  # noqa: E402
from kvtier.events.hashing import DEFAULT_SEED, BlockHasher  # noqa: E402
from kvtier.events.publisher import ZmqPublisher  # noqa: E402
from kvtier.events.schema import BlockRemoved, BlockStored, KVEventBatch  # noqa: E402
from kvtier.events.subscriber import Subscriber  # noqa: E402
from kvtier.layout import KVSpec  # noqa: E402
from kvtier.storage.disk import DiskTier  # noqa: E402

BLOCK = 16
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=2 * BLOCK)


def free_endpoint() -> str:
    from kvtier.procs import free_port

    return f"tcp://127.0.0.1:{free_port()}"


def test_hasher_is_vllms_sha256_chain() -> None:
    """The documented definition, spelled out: sha256(pickle((parent, tokens, None))) from H(seed)."""
    h = BlockHasher("sha256", 4, int_hashes=False)
    tokens = list(range(10))
    none = hashlib.sha256(pickle.dumps(DEFAULT_SEED, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    first = hashlib.sha256(pickle.dumps((none, (0, 1, 2, 3), None), protocol=pickle.HIGHEST_PROTOCOL)).digest()
    second = hashlib.sha256(pickle.dumps((first, (4, 5, 6, 7), None), protocol=pickle.HIGHEST_PROTOCOL)).digest()
    assert h.chain(None, tokens) == [first, second]  # the partial block (8, 9) is not hashed
    assert BlockHasher("sha256", 4, int_hashes=True).external(first) == int.from_bytes(first[-8:], "big")


def test_xxhash_without_seed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        BlockHasher("xxhash", 16)
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert BlockHasher("xxhash", 16).chain(None, list(range(16)))


def test_remote_endpoint_needs_opt_in() -> None:
    with pytest.raises(ConfigError, match="allow_remote"):
        ZmqPublisher("tcp://0.0.0.0:5999")


def test_publish_and_replay_after_missed_batches() -> None:
    pub = ZmqPublisher(free_endpoint(), free_endpoint(), topic="kvtier")
    try:
        events = [[BlockRemoved(block_hashes=[i], medium="kvtier/cpu")] for i in range(5)]
        for batch in events[:3]:  # published before anyone listens: missed by the subscriber
            pub.publish(batch)
        assert pub.flush()
        sub = Subscriber(pub.endpoint, pub.replay_endpoint, "kvtier")
        try:
            seen: list[tuple[int, KVEventBatch]] = []
            for _ in range(50):  # SUB joins asynchronously: publish until one arrives
                pub.publish(events[3])
                got = sub.recv(100)
                if got is not None:
                    seen.append(got)
                    break
            assert seen and seen[0][0] >= 3  # a gap: 0..2 were missed
            replayed = sub.replay_from(0)
            assert [s for s, _b in replayed][:4] == [0, 1, 2, 3]
            assert [b.events[0].block_hashes for _s, b in replayed[:3]] == [[0], [1], [2]]
            assert sub.replay_from(10**6) == []  # nothing that new: only the end marker
        finally:
            sub.close()
    finally:
        pub.close()


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[CacheEngine, Subscriber, BlockHasher]]:
    cfg = load_config(environ={}, overrides={"chunk_tokens": SPEC.chunk_tokens,
                                             "cpu": {"capacity": 3 * SPEC.chunk_bytes}})
    engine = CacheEngine(SPEC, "m", cfg, tiers=[(DiskTier(tmp_path / "d", 1 << 30), "raw")])
    hasher = BlockHasher("sha256", BLOCK, int_hashes=True)
    bridge = start_events(engine, EventsConfig(endpoint=free_endpoint(), replay_endpoint=free_endpoint()), hasher)
    sub = Subscriber(bridge.publisher.endpoint, bridge.publisher.replay_endpoint, "kvtier")
    try:
        yield engine, sub, hasher
    finally:
        sub.close()
        bridge.close()
        engine.close()


def _events(sub: Subscriber) -> list[Any]:
    return [e for _seq, batch in sub.replay_from(0) for e in batch.events]


def test_store_evict_and_lower_tier_events(published: tuple[CacheEngine, Subscriber, BlockHasher]) -> None:
    engine, sub, hasher = published
    tokens = list(range(100, 100 + 2 * SPEC.chunk_tokens + 5))  # two full chunks and a partial one
    assert engine.store(tokens, torch.zeros(SPEC.chunk_shape(len(tokens)))) == len(tokens)
    assert engine.storage.flush(10)
    expected = [hasher.external(h) for h in hasher.chain(None, tokens)]
    assert len(expected) == 4
    engine.store(list(range(900, 900 + 2 * SPEC.chunk_tokens)), torch.zeros(SPEC.chunk_shape(2 * SPEC.chunk_tokens)))
    assert engine.storage.flush(10)
    engine.probe.flush(5)
    engine.cpu.clear()
    deadline = time.monotonic() + 5
    events: list[Any] = []
    while time.monotonic() < deadline:
        events = _events(sub)
        if any(isinstance(e, BlockRemoved) for e in events):
            break
        time.sleep(0.05)
    stored = {e.medium: [] for e in events if isinstance(e, BlockStored)}
    for e in events:
        if isinstance(e, BlockStored):
            stored[e.medium].extend(e.block_hashes)
            assert e.block_size == BLOCK and len(e.token_ids) == BLOCK * len(e.block_hashes)
    assert stored["kvtier/cpu"][:4] == expected and stored["kvtier/disk"][:4] == expected
    first = next(e for e in events if isinstance(e, BlockStored) and e.block_hashes[0] == expected[2])
    assert first.parent_block_hash == expected[1] and first.token_ids == tokens[2 * BLOCK : 4 * BLOCK]
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= set(stored["kvtier/cpu"])
