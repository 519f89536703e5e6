"""Pipelined, batched lower-tier reads and batched write-back, over real DiskTier directories.

The recording tiers below are real :class:`DiskTier` instances that also note how the manager called them
(batch sizes) or fail on purpose at a chosen call (fault injection: a disk that disappears mid-read
cannot be produced on demand otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.layout import KVSpec
from kvtier.nice import set_thread_nice, thread_nice
from kvtier.record import ChunkRecord
from kvtier.storage.disk import DiskTier, chunk_path

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
N_CHUNKS = 12
TOKENS = list(range(1000, 1000 + N_CHUNKS * 16))


class RecordingDisk(DiskTier):
    """A real disk tier that records the batches it is given and can fail the batched read that asks
    for ``fail_key`` (batches are read on two threads, so "the n-th call" would not be one batch)."""

    def __init__(self, *args: object, fail_key: ChunkKey | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.read_batches: list[int] = []
        self.read_nice: list[int] = []  # the reading thread's nice value, per batch
        self.write_batches: list[int] = []
        self.fail_key = fail_key

    def get_each_into_parts(self, keys: Sequence[ChunkKey], payloads: Sequence[Sequence[memoryview]],
                            fn: Callable[[int, bytes | memoryview | None], None]) -> None:
        self.read_batches.append(len(keys))
        self.read_nice.append(thread_nice())
        if self.fail_key in keys:
            raise TierUnavailable("injected: disk gone mid-retrieve")
        super().get_each_into_parts(keys, payloads, fn)

    def put_many(self, items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        self.write_batches.append(len(items))
        super().put_many(items)


def make(tier: DiskTier, slots: int = 64) -> CacheEngine:
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16, "store_queue": 64,
                                             "cpu": {"capacity": slots * SPEC.chunk_bytes}})
    engine = CacheEngine(SPEC, "test-model", cfg, tiers=[(tier, "raw")])
    engine.storage.read_batch = 2  # several batches per retrieve, so read-ahead really happens
    return engine


def kv_for(n: int) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(n), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[RecordingDisk]:
    tier = RecordingDisk(tmp_path / "disk", 1 << 30, fsync=False)
    yield tier
    tier.close()


def stored(engine: CacheEngine, tier: RecordingDisk) -> torch.Tensor:
    kv = kv_for(len(TOKENS))
    assert engine.store(TOKENS, kv) == len(TOKENS)
    assert engine.storage.flush(10)
    assert len(tier) == N_CHUNKS
    engine.cpu.clear()  # every hit must now come from disk
    return kv


def free_slots(engine: CacheEngine) -> int:
    return engine.cpu.arena.free_slots


def test_retrieve_reads_in_batches_ahead_and_is_exact(disk: RecordingDisk) -> None:
    engine = make(disk)
    kv = stored(engine, disk)
    into = torch.full_like(kv, float("nan"))
    assert engine.retrieve(TOKENS, into) == len(TOKENS)
    assert torch.equal(into, kv)
    assert disk.read_batches == [2] * (N_CHUNKS // 2)  # batched, in order, each chunk read once
    stats = engine.stats()
    assert stats["disk"]["hits"] == N_CHUNKS and stats["disk"]["gets_zero_copy"] == N_CHUNKS
    assert stats["engine"]["promoted_chunks"] == N_CHUNKS and len(engine.cpu) == N_CHUNKS
    again = torch.zeros_like(kv)  # promoted: now served by the CPU tier without touching the disk
    assert engine.retrieve(TOKENS, again) == len(TOKENS) and torch.equal(again, kv)
    assert len(disk.read_batches) == N_CHUNKS // 2
    engine.close()


def test_damaged_chunk_mid_batch_ends_the_prefix(disk: RecordingDisk) -> None:
    engine = make(disk)
    kv = stored(engine, disk)
    chunks = engine.chunker.chunks(TOKENS)[1]
    bad = 5  # second chunk of the third batch; read-ahead has already fetched later ones
    path = chunk_path(disk.root, chunks[bad].key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    before = free_slots(engine)
    into = torch.full_like(kv, float("nan"))
    hit = engine.retrieve(TOKENS, into)
    assert hit == chunks[bad].start
    assert torch.equal(into[:, :, :hit], kv[:, :, :hit])
    assert torch.isnan(into[:, :, hit:]).all()  # nothing past the hit was written
    stats = engine.stats()
    assert stats["disk"]["corrupt"] == 1 and stats["disk"]["quarantined"] == 1
    assert stats["manager"]["read_ahead_dropped"] == N_CHUNKS - bad - 1
    assert len(engine.cpu) == bad  # the verified prefix was promoted, nothing else
    assert free_slots(engine) == before - bad  # every other reserved slot was given back
    engine.close()


def test_tier_failure_mid_retrieve_is_a_counted_prefix_miss(tmp_path: Path) -> None:
    tier = RecordingDisk(tmp_path / "disk", 1 << 30, fsync=False)
    engine = make(tier)
    tier.fail_key = engine.chunker.chunks(TOKENS)[1][4].key  # the third batch: chunks 4 and 5
    kv = stored(engine, tier)
    before = free_slots(engine)
    into = torch.full_like(kv, float("nan"))
    assert engine.retrieve(TOKENS, into) == 4 * 16  # batches 1 and 2 arrived, batch 3 failed
    assert torch.equal(into[:, :, : 4 * 16], kv[:, :, : 4 * 16]) and torch.isnan(into[:, :, 4 * 16 :]).all()
    stats = engine.stats()
    assert stats["disk"]["errors"] == 1 and stats["disk"]["misses"] == 1  # (a batch read alongside may succeed)
    assert free_slots(engine) == before - 4
    engine.close()
    tier.close()


def test_arena_smaller_than_the_hit_promotes_what_fits(tmp_path: Path) -> None:
    first = RecordingDisk(tmp_path / "disk", 1 << 30, fsync=False)
    big = make(first)
    kv = stored(big, first)
    big.close()
    first.close()
    tier = RecordingDisk(tmp_path / "disk", 1 << 30, fsync=False)  # a restart with a 4-chunk arena
    small = make(tier, slots=4)
    assert small.lookup(TOKENS) == len(TOKENS)
    into = torch.full_like(kv, float("nan"))
    assert small.retrieve(TOKENS, into) == 4 * 16  # no slot for the fifth chunk: a shorter hit
    assert torch.equal(into[:, :, : 4 * 16], kv[:, :, : 4 * 16]) and torch.isnan(into[:, :, 4 * 16 :]).all()
    assert sum(tier.read_batches) == 4 and len(small.cpu) == 4
    small.close()
    tier.close()


def test_write_back_goes_down_in_batches(disk: RecordingDisk) -> None:
    engine = make(disk)
    kv = kv_for(len(TOKENS))
    assert engine.store(TOKENS, kv) == len(TOKENS)
    assert engine.storage.flush(10)
    assert sum(disk.write_batches) == N_CHUNKS
    assert max(disk.write_batches) > 1  # the writer took what was queued, not one chunk per call
    assert engine.stats()["disk"]["writes"] == N_CHUNKS
    engine.cpu.clear()
    into = torch.zeros_like(kv)
    assert engine.retrieve(TOKENS, into) == len(TOKENS) and torch.equal(into, kv)
    engine.close()


def test_flush_returns_when_written_and_times_out_otherwise(disk: RecordingDisk) -> None:
    engine = make(disk)
    assert engine.storage.flush(0.5)  # nothing queued
    assert engine.store(TOKENS, kv_for(len(TOKENS))) == len(TOKENS)
    assert engine.storage.flush(10) and len(disk) == N_CHUNKS
    engine.close()


def test_store_admits_group_by_group(disk: RecordingDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtier.engine.STORE_GROUP_BYTES", 3 * SPEC.chunk_bytes)
    engine = make(disk, slots=5)
    kv = kv_for(len(TOKENS))
    assert engine.store(TOKENS, kv) == 5 * 16  # groups of 3: the second one found room for 2 only
    assert engine.storage.flush(10) and len(disk) == 5 and len(engine.cpu) == 5
    into = torch.full_like(kv, float("nan"))
    assert engine.retrieve(TOKENS, into) == 5 * 16 and torch.equal(into[:, :, : 5 * 16], kv[:, :, : 5 * 16])
    engine.close()


def test_retrieve_after_close_is_a_miss_not_a_crash(disk: RecordingDisk) -> None:
    engine = make(disk)
    kv = stored(engine, disk)
    engine.storage._reader.shutdown(wait=True)  # type: ignore[union-attr]  # as close() does, mid-serving
    assert engine.retrieve(TOKENS, torch.zeros_like(kv)) == 0
    assert engine.stats()["disk"]["misses"] == 1
    engine.close()


@pytest.mark.parametrize("spare", [3 * N_CHUNKS + 4, 4])
def test_concurrent_retrieves_promote_once_and_leak_nothing(disk: RecordingDisk, spare: int) -> None:
    """Four threads retrieve the same prompt from disk at once. With room for all their reservations
    each gets the whole prompt; with 4 spare slots they compete, and each still gets an exact prefix."""
    import threading

    engine = make(disk, slots=N_CHUNKS + spare)
    kv = stored(engine, disk)
    outs = [torch.full_like(kv, float("nan")) for _ in range(4)]
    hits: list[int] = []

    def worker(out: torch.Tensor) -> None:
        hits.append(engine.retrieve(TOKENS, out))

    threads = [threading.Thread(target=worker, args=(out,)) for out in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(hits) == 4
    if spare > 4:
        assert hits == [len(TOKENS)] * 4
    for out in outs:  # every hit is an exact prefix and nothing past it was written
        hit = int((~torch.isnan(out[0, 0, :, 0, 0])).sum())
        assert hit in hits and torch.equal(out[:, :, :hit], kv[:, :, :hit]) and torch.isnan(out[:, :, hit:]).all()
    assert len(engine.cpu) <= N_CHUNKS  # each chunk indexed at most once; duplicate promotions gave slots back
    assert engine.cpu.arena.free_slots == N_CHUNKS + spare - len(engine.cpu)
    assert not any(engine.cpu.arena.busy(s) for s in range(N_CHUNKS + spare))
    engine.close()


def test_write_back_seals_the_next_chunk_while_writing(disk: RecordingDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write-back is a pipeline: the frame (checksum + MAC) of chunk 2 is computed while chunk 1 is being
    written, not after. Sealing chunk 2 waits for a write to start, so a writer that sealed its whole
    batch first would find chunk 2 sealed before its write, or never sealed during it."""
    from kvtier import frames

    writing, second_sealed = threading.Event(), threading.Event()
    sealed: list[ChunkKey] = []
    real_pack = frames.pack_parts

    def pack_parts(record: ChunkRecord, *args: Any, **kwargs: Any) -> tuple[bytes, bytes | memoryview]:
        if len(sealed) == 1:
            writing.wait(5)
        sealed.append(record.key)
        if len(sealed) == 2:
            second_sealed.set()
        return real_pack(record, *args, **kwargs)

    seen: list[tuple[bool, bool]] = []  # per put_many: (chunk 2 sealed before the write, sealed during it)
    real_put = disk.put_many

    def put_many(items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        before = second_sealed.is_set()
        writing.set()
        seen.append((before, second_sealed.wait(5)))
        real_put(items)

    monkeypatch.setattr(frames, "pack_parts", pack_parts)
    monkeypatch.setattr(disk, "put_many", put_many)
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16, "store_queue": 64, "cpu": {"capacity": "4MiB"},
                                             "auth": {"secret": "pipeline test secret, long enough"}})
    engine = CacheEngine(SPEC, "test-model", cfg, tiers=[(disk, "raw")])
    kv = kv_for(len(TOKENS))
    assert engine.store(TOKENS, kv) == len(TOKENS)
    assert engine.storage.flush(30)
    assert seen[0] == (False, True)
    assert len(disk) == N_CHUNKS and engine.stats()["disk"]["writes"] == N_CHUNKS
    engine.cpu.clear()
    into = torch.zeros_like(kv)
    assert engine.retrieve(TOKENS, into) == len(TOKENS) and torch.equal(into, kv)  # every MAC verified
    engine.close()


def test_frames_are_checked_on_the_reader_and_a_check_bug_is_a_counted_miss(
        disk: RecordingDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame check (checksum / MAC, metadata, decode) runs on the thread that read the frame, so
    the caller only compares records and copies; an unexpected exception from the check (a codec bug)
    ends the hit at that chunk as a counted corrupt miss, never an exception in the engine or a hang."""
    import kvtier.frames as frames_mod

    engine = make(disk)
    kv = stored(engine, disk)
    bad = engine.chunker.chunks(TOKENS)[1][5].key
    threads: set[str] = set()
    real = frames_mod.unpack_head_into

    def checked(head: Any, spec: KVSpec, out: torch.Tensor, expect: ChunkKey | None = None,
                auth: Any = None) -> Any:
        threads.add(threading.current_thread().name)
        if expect == bad:
            raise RuntimeError("injected: a bug in the frame check")
        return real(head, spec, out, expect, auth)

    monkeypatch.setattr(frames_mod, "unpack_head_into", checked)
    into = torch.zeros_like(kv)
    assert engine.retrieve(TOKENS, into) == 5 * 16
    assert torch.equal(into[:, :, : 5 * 16], kv[:, :, : 5 * 16])
    assert threads and threading.current_thread().name not in threads
    assert all(name.startswith("kvtier-read") for name in threads)
    assert engine.stats()["disk"]["corrupt"] == 1
    assert len(engine.cpu) == 5  # the chunk that failed its check and every one after it stayed out
    engine.close()


def test_readers_read_at_the_callers_priority(disk: RecordingDisk) -> None:
    """A retrieve from a low-priority thread (vLLM's asynchronous loader) reads at its nice value; a
    later one from a normal thread reads at that one's again, where the system allows raising it back."""
    engine = make(disk)
    try:
        kv = stored(engine, disk)
        base = thread_nice()
        low = min(base + 5, 19)

        def low_retrieve() -> int:
            assert set_thread_nice(low)
            out = torch.empty_like(kv)
            return engine.retrieve(TOKENS, out)

        worker = threading.Thread(target=lambda: results.append(low_retrieve()))
        results: list[int] = []
        worker.start()
        worker.join(30)
        assert results == [len(TOKENS)] and disk.read_nice and set(disk.read_nice) == {low}
        disk.read_nice.clear()
        engine.cpu.clear()
        assert engine.retrieve(TOKENS, torch.empty_like(kv)) == len(TOKENS)
        refused = engine.storage.counters["reader_nice_refused"]
        assert set(disk.read_nice) == ({low} if refused else {base})  # refused: no privilege to raise it
    finally:
        engine.close()


def test_put_frame_counts_every_write_when_called_from_many_threads(tmp_path: Path) -> None:
    """put_frame runs on several threads at once (SGLang's put threads): every write is counted once,
    with thread switches forced between bytecodes so an unlocked read-modify-write would lose some."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.storage.manager import StorageManager

    tier = DiskTier(tmp_path / "disk", 1 << 30, fsync=False)
    manager = StorageManager(SPEC, [(tier, "raw")])
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def put(t: int) -> None:
            for i in range(150):
                assert manager.put_frame((t * 1000 + i).to_bytes(16, "little"), [b"head", b"x" * 64]) == 0

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(put, range(6)))  # re-raises a thread's failed assertion here
    finally:
        sys.setswitchinterval(old)
    counts = manager.stats()
    assert counts[tier.name]["writes"] == 6 * 150 and counts[tier.name]["bytes_written"] == 6 * 150 * 68
    assert len(tier) == 6 * 150
    manager.close()
    tier.close()
