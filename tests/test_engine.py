"""CacheEngine over the CPU tier: exact round trips, partial chunks, arena limits, pins, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kvtier import frames
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, LayoutError
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord, token_record

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)


def make(slots: int = 64, policy: str = "lru", **over) -> CacheEngine:
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16,
                                             "cpu": {"capacity": slots * SPEC.chunk_bytes, "policy": policy},
                                             **over})
    return CacheEngine(SPEC, "test-model", cfg, tiers=[])


def kv_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((SPEC.num_layers, 2, n, SPEC.num_kv_heads, SPEC.head_dim), generator=g)


def per_layer(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])]


def test_round_trip_exact_tensor_and_per_layer() -> None:
    e = make()
    tokens = list(range(1000, 1050))
    kv = kv_for(50)
    assert e.store(tokens, kv) == 50
    assert e.lookup(tokens) == 50
    out = torch.zeros_like(kv)
    assert e.retrieve(tokens, out) == 50
    assert torch.equal(out, kv)
    # per-layer views in an engine-like [heads, tokens, dim] layout, written through transposes
    dest = [(torch.zeros(2, 50, 8), torch.zeros(2, 50, 8)) for _ in range(3)]
    views = [(k.transpose(0, 1), v.transpose(0, 1)) for k, v in dest]
    assert e.retrieve(tokens, views) == 50
    for layer, (k, v) in enumerate(dest):
        assert torch.equal(k.transpose(0, 1), kv[layer, 0]) and torch.equal(v.transpose(0, 1), kv[layer, 1])


def test_prefix_semantics_and_partial_chunk() -> None:
    e = make()
    tokens = list(range(40))  # 2 full chunks + 8-token partial
    kv = kv_for(40)
    e.store(tokens, per_layer(kv))
    longer = tokens + [7] * 30
    assert e.lookup(longer) == 32  # the stored partial chunk only hits a prompt ending there
    out = torch.zeros(kv_for(70).shape)
    assert e.retrieve(longer, out) == 32
    assert torch.equal(out[:, :, :32], kv[:, :, :32])
    assert torch.count_nonzero(out[:, :, 32:]) == 0  # nothing beyond the hit was written
    assert e.lookup(tokens[:20]) == 16
    assert e.lookup([5, *tokens[1:]]) == 0


def test_partial_chunks_off() -> None:
    e = make(save_partial_chunks=False)
    assert e.store(list(range(40)), kv_for(40)) == 32
    assert e.lookup(list(range(40))) == 32


def test_skip_and_existing_chunks_not_copied_again() -> None:
    e = make()
    tokens = list(range(64))
    e.store(tokens[:32], kv_for(32))
    before = e.stats()["engine"]["stored_tokens"]
    e.store(tokens, kv_for(64))
    assert e.stats()["engine"]["stored_tokens"] - before == 32
    e2 = make()
    assert e2.store(tokens, kv_for(64), skip_tokens=32) == 64
    assert e2.lookup(tokens) == 0  # first chunks were skipped, so no prefix is cached


def test_layout_errors() -> None:
    e = make()
    with pytest.raises(LayoutError, match="dtype"):
        e.store(list(range(16)), kv_for(16).to(torch.bfloat16))
    with pytest.raises(LayoutError, match="covers 10 tokens"):
        e.store(list(range(16)), kv_for(10))


def test_arena_too_small_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="holds no chunk"):
        CacheEngine(SPEC, "m", load_config(environ={}, overrides={"chunk_tokens": 16, "cpu": {"capacity": 100}}),
                    tiers=[])


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "s3fifo"])
def test_arena_full_evicts_but_never_grows(policy: str) -> None:
    e = make(slots=4, policy=policy)
    for i in range(10):
        tokens = [i * 1000 + t for t in range(16)]
        assert e.store(tokens, kv_for(16, seed=i)) == 16
    assert len(e.cpu) == 4
    assert e.cpu.arena.num_slots == 4
    assert e.stats()["cpu"]["evictions"] == 6
    last = [9000 + t for t in range(16)]
    out = torch.zeros(kv_for(16).shape)
    assert e.retrieve(last, out) == 16 and torch.equal(out, kv_for(16, seed=9))


def test_all_pinned_refuses_store_and_counts() -> None:
    e = make(slots=2)
    a, b, c = (list(range(s, s + 16)) for s in (0, 100, 200))
    e.store(a, kv_for(16))
    e.store(b, kv_for(16))
    assert e.pin(a) == 16 and e.pin(b) == 16
    assert e.store(c, kv_for(16)) == 0
    assert e.stats()["cpu"]["store_refused_all_busy"] == 1
    assert e.lookup(a) == 16 and e.lookup(b) == 16  # pinned data intact
    e.unpin(a)
    assert e.store(c, kv_for(16)) == 16
    assert e.lookup(a) == 0 and e.lookup(b) == 16


def test_clear_keeps_pinned() -> None:
    e = make()
    a, b = list(range(16)), list(range(100, 116))
    e.store(a, kv_for(16))
    e.store(b, kv_for(16))
    e.pin(a)
    assert e.clear() == 1
    assert e.lookup(a) == 16 and e.lookup(b) == 0
    assert e.remove(a) == 0  # pinned chunks cannot be removed
    e.unpin(a)
    assert e.remove(a) == 1 and e.lookup(a) == 0


def test_layerwise_store_and_retrieve() -> None:
    e = make()
    told: list[list[int]] = []
    e.chunk_listeners.append(lambda _arr, chunks: told.append([c.end for c in chunks]))
    tokens = list(range(50))
    kv = kv_for(50)
    with e.layerwise_store(tokens) as w:
        for layer in range(SPEC.num_layers):
            w.layer(layer, kv[layer, 0], kv[layer, 1])
    assert e.lookup(tokens) == 50
    assert told == [[16, 32, 48, 50]]  # admitted chunks are announced as store's are
    out = torch.zeros_like(kv)
    with e.layerwise_retrieve(tokens) as r:
        assert r.hit_tokens == 50
        for layer in range(SPEC.num_layers):
            r.layer(layer, out[layer, 0], out[layer, 1])
    assert torch.equal(out, kv)
    assert e.cpu.arena.free_slots == e.cpu.arena.num_slots - 4
    with pytest.raises(ValueError, match="without layers"), e.layerwise_store(list(range(500, 520))) as w:
        w.layer(0, kv[0, 0], kv[0, 1])
    assert e.lookup(list(range(500, 520))) == 0
    assert e.cpu.arena.free_slots == e.cpu.arena.num_slots - 4  # aborted slots were given back


def test_concurrent_store_retrieve_no_corruption() -> None:
    e = make(slots=24)
    errors: list[str] = []

    def worker(wid: int) -> None:
        for i in range(40):
            seed = (wid * 7 + i) % 12
            tokens = [seed * 10_000 + t for t in range(48)]
            kv = kv_for(48, seed=seed)
            e.store(tokens, kv)
            out = torch.zeros_like(kv)
            hit = e.retrieve(tokens, out)
            if not torch.equal(out[:, :, :hit], kv[:, :, :hit]):
                errors.append(f"worker {wid} iteration {i}: wrong KV for hit {hit}")
            if torch.count_nonzero(out[:, :, hit:]):
                errors.append(f"worker {wid} iteration {i}: wrote beyond hit {hit}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert e.cpu.arena.free_slots + len(e.cpu) == e.cpu.arena.num_slots  # no slot leaked


def test_close_is_idempotent() -> None:
    e = make()
    assert e.close() == 0 and e.close() == 0


def test_fragmented_arena_round_trips_exactly() -> None:
    """Chunks land in consecutive slots (moved as one run) and, after removals, in scattered slots
    (moved one by one); both, and a mix within one prompt, round-trip bit for bit."""
    e = make(slots=12)
    fillers = [[10_000 + 100 * i + t for t in range(16)] for i in range(6)]
    for i, toks in enumerate(fillers):
        assert e.store(toks, kv_for(16, seed=100 + i)) == 16
    for toks in fillers[::2]:  # free slots 0, 2, 4: the next prompt gets 0, 2, 4, then 6, 7, ...
        assert e.remove(toks) == 1
    tokens = list(range(7 * 16 + 5))  # 7 full chunks and a partial one
    kv = kv_for(len(tokens), seed=7)
    assert e.store(tokens, kv) == len(tokens)
    for out in (torch.zeros_like(kv), None):
        if out is None:  # per-layer, transposed-stride views of the engine's own cache
            back = torch.zeros(SPEC.num_layers, 2, SPEC.num_kv_heads, len(tokens), SPEC.head_dim)
            target = [(back[layer, 0].transpose(0, 1), back[layer, 1].transpose(0, 1))
                      for layer in range(SPEC.num_layers)]
            assert e.retrieve(tokens, target) == len(tokens)
            assert torch.equal(back.transpose(2, 3), kv)
        else:
            assert e.retrieve(tokens, out) == len(tokens)
            assert torch.equal(out, kv)
    for i, toks in enumerate(fillers[1::2]):
        out = torch.zeros(SPEC.num_layers, 2, 16, SPEC.num_kv_heads, SPEC.head_dim)
        assert e.retrieve(toks, out) == 16 and torch.equal(out, kv_for(16, seed=101 + 2 * i))


def test_chunk_tokens_mismatch_is_a_config_error_naming_both() -> None:
    cfg = load_config(environ={}, overrides={"chunk_tokens": 32, "cpu": {"capacity": 8 * SPEC.chunk_bytes}})
    with pytest.raises(ConfigError, match="spec says 16, the config says 32"):
        CacheEngine(SPEC, "m", cfg, tiers=[])


# ---- the one admission path -----------------------------------------------------------------------
def records_for(e: CacheEngine, tokens: list[int]) -> list[ChunkRecord]:
    arr, chunks = e.chunker.chunks(tokens)
    return [token_record(c, arr) for c in chunks]


def test_admit_commits_the_filled_prefix_and_gives_back_the_rest() -> None:
    e = make(slots=8)
    recs = records_for(e, list(range(64)))  # 4 chunks
    seen: list[int] = []

    def fill(slots: list[int]) -> int:
        seen.extend(slots)
        for slot, rec in zip(slots, recs):
            e.cpu.arena.view(slot, rec.num_tokens).fill_(float(rec.key[0]))
        return 2  # only the first two verified

    admitted = e.cpu.admit(recs, fill, keep=True)
    assert len(seen) == 4 and len(admitted) == 2 and all(s is not None for s in admitted)
    assert [e.cpu.contains(r) for r in recs] == [True, True, False, False]
    assert e.cpu.arena.free_slots == 8 - 2  # the two unfilled slots came back
    for slot in admitted:
        assert e.cpu.arena.busy(slot)  # kept for the caller
        e.cpu.release(slot)
    assert e.cpu.admit(recs[:1], lambda slots: 1) == [None]  # already indexed: ours dropped, theirs stays
    assert e.cpu.arena.free_slots == 6


def test_admit_fill_error_gives_back_every_slot() -> None:
    e = make(slots=4)
    recs = records_for(e, list(range(48)))

    def fill(slots: list[int]) -> int:
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError, match="copy failed"):
        e.cpu.admit(recs, fill)
    assert e.cpu.arena.free_slots == 4 and len(e.cpu) == 0


def test_admit_reserves_only_what_fits() -> None:
    e = make(slots=2)
    recs = records_for(e, list(range(64)))
    admission = e.cpu.reserve(recs)
    assert len(admission) == 2 and admission.records == recs[:2]
    assert e.cpu.reserve(recs[2:]).slots == []  # every slot reserved: nothing evictable
    admission.abort()
    assert e.cpu.arena.free_slots == 2
    with pytest.raises(RuntimeError, match="already finished"):
        admission.commit(0)


def test_admit_frame_outcomes() -> None:
    e = make(slots=2)
    tokens = list(range(48))
    kv = kv_for(48)
    a, b, _c = records_for(e, tokens)
    frame_a = frames.pack(a, kv[:, :, :16].contiguous(), SPEC)
    assert e.admit_frame(b, frame_a) == "corrupt"  # frame of another key
    assert e.admit_frame(a._replace(identity=bytes(64)), frame_a) == "mismatch"
    broken = bytearray(frame_a)
    broken[-1] ^= 1
    assert e.admit_frame(a, bytes(broken)) == "corrupt"
    assert e.admit_frame(a, frame_a) == "fetched"
    assert e.admit_frame(a, frame_a) == "present"
    out = torch.zeros_like(kv)
    assert e.retrieve(tokens[:16], out[:, :, :16]) == 16 and torch.equal(out[:, :, :16], kv[:, :, :16])
    assert e.cpu.arena.free_slots == 1


def test_colliding_key_with_other_tokens_is_a_counted_miss() -> None:
    e = make(slots=8)
    tokens = list(range(64))
    recs = records_for(e, tokens)
    forged = recs[2]._replace(identity=bytes(reversed(recs[2].identity)))  # same key, other tokens
    assert len(e.cpu.admit([*recs[:2], forged, recs[3]], lambda slots: len(slots))) == 4
    assert e.lookup(tokens) == 32  # chunks 0-1 verified; chunk 2 is a collision, not a hit
    assert e.cpu.counters["collisions"] == 1
    assert e.retrieve(tokens, torch.zeros_like(kv_for(64))) == 32


def test_store_in_groups_never_evicts_its_own_chunks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kvtier.storage.disk import DiskTier

    monkeypatch.setattr("kvtier.engine.STORE_GROUP_BYTES", 3 * SPEC.chunk_bytes)
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16, "cpu": {"capacity": 5 * SPEC.chunk_bytes}})
    # a lower tier: store goes group by group (without one it copies everything in one group)
    e = CacheEngine(SPEC, "test-model", cfg, tiers=[(DiskTier(tmp_path, 64 * SPEC.chunk_bytes, fsync=False), "raw")])
    try:
        tokens = list(range(12 * 16))
        # groups of 3: the second takes the 2 free slots, the third finds only this store's own chunks
        assert e.store(tokens, kv_for(12 * 16)) == 5 * 16
        e.storage.flush()
        assert e.lookup(tokens) == 5 * 16 and len(e.cpu) == 5
        assert e.cpu.arena.free_slots == 0 and not any(e.cpu.arena.busy(s) for s in range(5))
    finally:
        e.close()
