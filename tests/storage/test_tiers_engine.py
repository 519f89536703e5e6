"""CacheEngine over real DiskTier / FsTier directories: hits from disk, promotion, damage,
restart, disk full, two engines sharing an fs tier, and tiers built from config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from storage_support import tmpfs

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.layout import KVSpec
from kvtier.storage.base import Tier
from kvtier.storage.disk import QUARANTINE, DiskTier, chunk_path
from kvtier.storage.factory import build_tiers
from kvtier.storage.fs import FsTier

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
TOKENS = list(range(500, 580))  # 5 full chunks
N_CHUNKS = 5


def make(tiers: list[tuple[Tier, str]], slots: int = 64, promote: bool = True) -> CacheEngine:
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16,
                                             "cpu": {"capacity": slots * SPEC.chunk_bytes, "promote": promote}})
    return CacheEngine(SPEC, "test-model", cfg, tiers=tiers)


def kv_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.chunk_shape(n), generator=g)


def disk_stats(e: CacheEngine) -> dict[str, int | float]:
    return e.stats()["disk"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[CacheEngine]:
    e = make([(DiskTier(tmp_path / "disk", 1 << 30), "raw")])
    yield e
    e.close()


def stored(e: CacheEngine) -> torch.Tensor:
    kv = kv_for(len(TOKENS))
    assert e.store(TOKENS, kv) == len(TOKENS)
    assert e.storage.flush(10)
    assert disk_stats(e)["chunks"] == N_CHUNKS
    return kv


def test_hits_come_from_disk_and_are_promoted(engine: CacheEngine) -> None:
    kv = stored(engine)
    engine.cpu.clear()
    assert len(engine.cpu) == 0 and engine.lookup(TOKENS) == len(TOKENS)
    out = torch.zeros_like(kv)
    assert engine.retrieve(TOKENS, out) == len(TOKENS)
    assert torch.equal(out, kv)
    assert disk_stats(engine)["hits"] == N_CHUNKS and engine.stats()["engine"]["promoted_chunks"] == N_CHUNKS
    assert disk_stats(engine)["gets_zero_copy"] == N_CHUNKS  # read straight into the CPU slots
    assert len(engine.cpu) == N_CHUNKS
    out.zero_()
    assert engine.retrieve(TOKENS, out) == len(TOKENS) and torch.equal(out, kv)
    assert disk_stats(engine)["hits"] == N_CHUNKS  # the second retrieve was served from CPU


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_chunk_is_never_returned(engine: CacheEngine, damage: str) -> None:
    kv = stored(engine)
    _arr, chunks = engine.chunker.chunks(TOKENS)
    path = chunk_path(engine.storage.slots[0].tier.root, chunks[2].key)  # type: ignore[attr-defined]
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40  # inside the payload
        path.write_bytes(data)
    else:
        os.truncate(path, path.stat().st_size - 100)
    engine.cpu.clear()
    out = torch.zeros_like(kv)
    hit = engine.retrieve(TOKENS, out)
    assert hit == chunks[2].start  # the prefix before the damaged chunk, nothing after
    assert torch.equal(out[:, :, :hit], kv[:, :, :hit])
    assert torch.count_nonzero(out[:, :, hit:]) == 0
    s = disk_stats(engine)
    assert s["quarantined"] == 1 and s["chunks"] == N_CHUNKS - 1
    if damage == "flip":
        assert s["corrupt"] == 1  # caught by the manager's checksum
    assert not path.exists() and len(list((path.parents[1] / QUARANTINE).iterdir())) == 1
    assert engine.lookup(TOKENS) == chunks[2].start  # and it stays a miss


def test_restart_serves_hits_from_the_same_directory(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={
        "chunk_tokens": 16, "cpu": {"capacity": 64 * SPEC.chunk_bytes},
        "disk": {"enabled": True, "path": str(tmp_path / "disk"), "capacity": "1MiB"},
    })
    kv = kv_for(len(TOKENS))
    with CacheEngine(SPEC, "test-model", cfg) as first:
        first.store(TOKENS, kv)
    with CacheEngine(SPEC, "test-model", cfg) as second:  # a new process would do the same
        assert second.lookup(TOKENS) == len(TOKENS)
        out = torch.zeros_like(kv)
        assert second.retrieve(TOKENS, out) == len(TOKENS) and torch.equal(out, kv)


def test_disk_full_is_counted_and_reads_keep_working(tmp_path: Path) -> None:
    with tmpfs(tmp_path, "128k") as mnt:
        e = make([(DiskTier(mnt / "disk", 1 << 30), "raw")], slots=256)
        try:
            first = stored(e)
            more = list(range(10_000, 10_000 + 16 * 40))  # 40 chunks of ~6 KiB: more than fits
            e.store(more, kv_for(len(more), seed=1))
            assert e.storage.flush(30)
            s = disk_stats(e)
            assert s["enospc"] >= 1 and s["chunks"] < N_CHUNKS + 40 and s["healthy"] == 1
            e.cpu.clear()
            out = torch.zeros_like(first)
            assert e.retrieve(TOKENS, out) == len(TOKENS) and torch.equal(out, first)  # old data intact
        finally:
            e.close()


def test_two_engines_share_an_fs_tier(tmp_path: Path) -> None:
    a = make([(FsTier(tmp_path / "shared"), "raw")])
    b = make([(FsTier(tmp_path / "shared"), "raw")])
    try:
        kv = kv_for(len(TOKENS))
        a.store(TOKENS, kv)
        assert a.storage.flush(10)
        assert b.lookup(TOKENS) == len(TOKENS)
        out = torch.zeros_like(kv)
        assert b.retrieve(TOKENS, out) == len(TOKENS) and torch.equal(out, kv)
        assert b.stats()["fs"]["hits"] == N_CHUNKS and b.stats()["fs"]["gets_zero_copy"] == N_CHUNKS
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["disk", "fs"])
def test_without_promotion_hits_are_read_straight_into_the_destination(tmp_path: Path, kind: str) -> None:
    """``preadv`` into the caller's per-layer K and V rows; the CPU tier stays empty; a chunk damaged on
    disk ends the hit there (counted) and the chunks before it are exact."""
    tier: Tier = DiskTier(tmp_path / "t", 1 << 30, fsync=False) if kind == "disk" else FsTier(tmp_path / "t")
    with make([(tier, "raw")], promote=False) as e:
        kv = kv_for(len(TOKENS), seed=3)
        assert e.store(TOKENS, kv) == len(TOKENS) and e.storage.flush(10)
        e.cpu.clear()
        out = torch.zeros_like(kv)
        assert e.retrieve(TOKENS, out) == len(TOKENS) and torch.equal(out, kv)
        assert len(e.cpu) == 0 and e.stats()["engine"]["direct_chunks"] == N_CHUNKS
        assert e.stats()[kind]["gets_zero_copy"] == N_CHUNKS
        _arr, chunks = e.chunker.chunks(TOKENS)
        path = chunk_path(tmp_path / "t", chunks[3].key)
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40  # inside the payload
        path.write_bytes(data)
        out = torch.zeros_like(kv)
        assert e.retrieve(TOKENS, out) == chunks[3].start
        assert torch.equal(out[:, :, : chunks[3].start], kv[:, :, : chunks[3].start])
        assert e.stats()[kind]["corrupt"] == 1 and len(e.cpu) == 0


def test_factory_builds_disk_and_fs_in_order(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={
        "disk": {"enabled": True, "path": str(tmp_path / "d"), "capacity": "1MiB", "fsync": False},
        "fs": {"enabled": True, "path": str(tmp_path / "f"), "codec": "raw"},
    })
    tiers = build_tiers(cfg, SPEC)
    try:
        assert [type(t).__name__ for t, _ in tiers] == ["DiskTier", "FsTier"]
        assert isinstance(tiers[0][0], DiskTier) and tiers[0][0].capacity_bytes == 1 << 20
    finally:
        for t, _ in tiers:
            t.close()
    with pytest.raises(ConfigError, match=r"fs\.path"):
        build_tiers(load_config(environ={}, overrides={"fs": {"enabled": True}}), SPEC)
    with pytest.raises(ConfigError, match="codec"):
        build_tiers(load_config(environ={}, overrides={"disk": {"enabled": True, "codec": "nope",
                                                                "path": str(tmp_path / "x")}}), SPEC)


def test_lower_tier_frame_of_other_tokens_is_a_counted_miss(engine: CacheEngine, monkeypatch) -> None:
    """With every key forced equal, a disk frame stored for other tokens must not be returned."""
    import kvtier.keys as keys_mod

    monkeypatch.setattr(keys_mod, "_xxh3_128", lambda data: b"\x00" * 16)
    kv = kv_for(16)
    assert engine.store(list(range(16)), kv) == 16
    assert engine.storage.flush(10)
    engine.cpu.clear()
    out = torch.zeros_like(kv)
    assert engine.retrieve(list(range(1, 17)), out) == 0
    assert torch.count_nonzero(out) == 0
    assert disk_stats(engine)["collisions"] >= 1
    assert engine.retrieve(list(range(16)), out) == 16 and torch.equal(out, kv)
