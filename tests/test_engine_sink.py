"""CacheEngine.retrieve_to / store_from: chunks handed to a caller's callback instead of a tensor, over
the CPU tier and a real DiskTier (promotion on and off): exact bytes, order, partial and damaged hits,
and a callback that raises (no slot leaked, nothing half admitted)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvtier import engine as engine_module
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.layout import KVSpec
from kvtier.storage.base import Tier
from kvtier.storage.disk import DiskTier, chunk_path

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
TOKENS = list(range(700, 772))  # 4 full chunks + an 8-token partial one
C = SPEC.chunk_tokens


def make(tiers: list[tuple[Tier, str]], promote: bool = True, slots: int = 32) -> CacheEngine:
    cfg = load_config(environ={}, overrides={"chunk_tokens": C,
                                             "cpu": {"capacity": slots * SPEC.chunk_bytes, "promote": promote}})
    return CacheEngine(SPEC, "test-model", cfg, tiers=tiers)


def kv_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(n), generator=torch.Generator().manual_seed(seed))


class Sink:
    """Records every call, copies what it was handed (the view is valid during the call only) and
    raises at the call numbered ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.got: dict[int, torch.Tensor] = {}
        self.fail_at = fail_at

    def __call__(self, start: int, end: int, view: torch.Tensor) -> None:
        if len(self.calls) == self.fail_at:
            raise RuntimeError("sink failed")
        assert tuple(view.shape) == SPEC.chunk_shape(end - start)
        self.calls.append((start, end))
        self.got[start] = view.clone()


def idle(e: CacheEngine) -> bool:
    """No slot referenced or reserved: every slot is free or holds an indexed chunk."""
    arena = e.cpu.arena
    return not any(arena.busy(s) for s in range(arena.num_slots)) and arena.free_slots + len(e.cpu) == arena.num_slots


@pytest.fixture(params=[True, False], ids=["promote", "read-through"])
def disk_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CacheEngine]:
    """Chunks 0-1 in CPU, all five on disk."""
    e = make([(DiskTier(tmp_path / "disk", 1 << 30), "raw")], promote=request.param)
    kv = kv_for(len(TOKENS))
    assert e.store(TOKENS, kv) == len(TOKENS)
    assert e.storage.flush(10)
    e.cpu.clear()
    assert e.store(TOKENS[: 2 * C], kv[:, :, : 2 * C]) == 2 * C
    assert e.storage.flush(10)  # the write-back's slot references are released
    e.kv = kv  # type: ignore[attr-defined]
    yield e
    e.close()


def test_cpu_hit_exact_bytes_in_order_and_partial() -> None:
    e = make([])
    kv = kv_for(len(TOKENS))
    e.store(TOKENS, kv)
    sink = Sink()
    assert e.retrieve_to(TOKENS, sink) == len(TOKENS)
    assert sink.calls == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 72)]
    for start, end in sink.calls:
        assert torch.equal(sink.got[start], kv[:, :, start:end])
    # a longer prompt diverging inside chunk 3: only chunks 0-2 reach the sink
    other = TOKENS[:50] + [1] * 40
    sink = Sink()
    assert e.retrieve_to(other, sink) == 48 and sink.calls == [(0, 16), (16, 32), (32, 48)]
    assert e.retrieve_to([5, 6, 7], Sink()) == 0
    assert idle(e) and e.stats()["engine"]["retrieves"] == 3


def test_lower_tier_hits_reach_the_sink_verified_and_in_order(disk_engine: CacheEngine) -> None:
    e, kv = disk_engine, disk_engine.kv  # type: ignore[attr-defined]
    promote = e.config.cpu.promote
    sink = Sink()
    assert e.retrieve_to(TOKENS, sink) == len(TOKENS)
    assert [s for s, _e in sink.calls] == [0, 16, 32, 48, 64]
    for start, end in sink.calls:
        assert torch.equal(sink.got[start], kv[:, :, start:end])
    assert e.stats()["disk"]["hits"] == 3
    assert len(e.cpu) == (5 if promote else 2)  # without promotion the CPU tier is left as it was
    assert idle(e)


def test_damaged_chunk_ends_the_hit_before_the_sink(disk_engine: CacheEngine) -> None:
    e, kv = disk_engine, disk_engine.kv  # type: ignore[attr-defined]
    _arr, chunks = e.chunker.chunks(TOKENS)
    path = chunk_path(e.storage.slots[0].tier.root, chunks[3].key)  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the payload
    path.write_bytes(bytes(data))
    sink = Sink()
    assert e.retrieve_to(TOKENS, sink) == 3 * C
    assert sink.calls == [(0, 16), (16, 32), (32, 48)]  # nothing of chunk 3 or after
    assert torch.equal(sink.got[32], kv[:, :, 32:48])
    assert e.stats()["disk"]["corrupt"] == 1 and idle(e)


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # in a CPU hit; the first / a later lower-tier hit
def test_sink_exception_releases_every_slot_and_admits_nothing_read(disk_engine: CacheEngine, fail_at: int) -> None:
    e, kv = disk_engine, disk_engine.kv  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="sink failed"):
        e.retrieve_to(TOKENS, Sink(fail_at))
    assert idle(e) and len(e.cpu) == 2  # the promotion's admission was aborted whole
    sink = Sink()  # and the engine works on
    assert e.retrieve_to(TOKENS, sink) == len(TOKENS)
    assert all(torch.equal(sink.got[s], kv[:, :, s:t]) for s, t in sink.calls)


def test_store_from_fills_the_slots_exactly_and_skips() -> None:
    e = make([])
    kv = kv_for(len(TOKENS))
    seen: list[tuple[int, int]] = []

    def source(start: int, end: int, view: torch.Tensor) -> None:
        seen.append((start, end))
        view.copy_(kv[:, :, start:end])

    assert e.store_from(TOKENS, source, skip_tokens=2 * C) == len(TOKENS)
    assert seen == [(32, 48), (48, 64), (64, 72)]  # chunks ending at or before skip_tokens: not asked
    assert e.store_from(TOKENS[:64], source) == 64 and len(seen) == 5  # then only the two missing ones
    out = torch.zeros_like(kv)
    assert e.retrieve(TOKENS, out) == len(TOKENS) and torch.equal(out, kv)
    assert e.store_from([], source) == 0 and idle(e)


def test_store_from_exception_keeps_whole_groups_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "STORE_GROUP_BYTES", 2 * SPEC.chunk_bytes)  # groups of two chunks
    with make([(DiskTier(tmp_path / "disk", 1 << 30), "raw")]) as e:
        kv = kv_for(len(TOKENS))

        def source(start: int, end: int, view: torch.Tensor) -> None:
            if start == 3 * C:
                raise RuntimeError("source failed")
            view.copy_(kv[:, :, start:end])

        with pytest.raises(RuntimeError, match="source failed"):
            e.store_from(TOKENS, source)
        assert e.storage.flush(10)
        assert len(e.cpu) == 2 and idle(e)  # chunk 2 was filled, but its group was not: not admitted
        assert e.lookup(TOKENS) == 2 * C and e.stats()["disk"]["chunks"] == 2
        out = torch.zeros_like(kv)
        assert e.retrieve(TOKENS, out) == 2 * C and torch.equal(out[:, :, : 2 * C], kv[:, :, : 2 * C])
