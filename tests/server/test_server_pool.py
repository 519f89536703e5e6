"""The server's receive-buffer pool: dropped frames are reused for bodies of the same size, never while
anything still reads them, and never beyond the request budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from server_support import ServerProcess, make_frames, stats_of

from kvtier.layout import KVSpec
from kvtier.server.app import ByteBudget
from kvtier.server.pool import MIN_POOLED, BufferPool
from kvtier.server.store import MemoryStore
from kvtier.storage.remote import RemoteTier

N = MIN_POOLED * 2


class Budget:
    """A plain byte counter standing in for the server's request budget."""

    def __init__(self, cap: int) -> None:
        self.cap, self.used = cap, 0

    def hold(self, n: int) -> bool:
        if self.used + n > self.cap:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


def pooled_store(cap: int = 1 << 20) -> tuple[MemoryStore, BufferPool, Budget]:
    budget = Budget(cap)
    pool = BufferPool(budget.hold, budget.give_back)
    store = MemoryStore(1 << 30)
    store.on_drop = pool.offer
    return store, pool, budget


def received(pool: BufferPool, fill: int, n: int = N) -> np.ndarray:
    body = pool.take(n)
    body[:] = fill
    return body


def test_a_dropped_frame_is_reused_for_the_next_body_of_its_size() -> None:
    store, pool, budget = pooled_store()
    store.put(b"a" * 16, received(pool, 1))
    first = id(store.get(b"a" * 16))
    assert store.delete(b"a" * 16)
    assert (pool.bytes, budget.used) == (N, N)  # kept, and it holds budget
    assert id(pool.take(N + 1)) != first  # another size: a fresh buffer
    again = pool.take(N)
    assert id(again) == first and pool.reused == 1
    assert (pool.bytes, budget.used) == (0, 0)  # the budget went back with it


@pytest.mark.parametrize("how", ["frame", "memoryview", "slice", "numpy view"])
def test_a_frame_still_read_is_never_reused(how: str) -> None:
    """A reply being sent holds the frame, a view of it or a slice of such a view (as the transport
    does): the store may drop the frame meanwhile, but its bytes must not change under the reader."""
    store, pool, _budget = pooled_store()
    store.put(b"a" * 16, received(pool, 7))
    frame = store.get(b"a" * 16)
    assert isinstance(frame, np.ndarray)
    reader: object = {"frame": frame, "memoryview": memoryview(frame), "slice": memoryview(frame)[10:20],
                      "numpy view": frame[5:]}[how]
    del frame
    store.delete(b"a" * 16)  # evicted, replaced or cleared while a reply sends it
    assert pool.bytes == 0
    store.put(b"b" * 16, received(pool, 9))
    assert bytes(memoryview(reader)) == bytes(len(memoryview(reader))).replace(b"\0", b"\7")  # type: ignore[arg-type]
    del reader


def test_small_bodies_views_and_foreign_frames_are_not_kept() -> None:
    store, pool, _budget = pooled_store()
    store.put(b"s" * 16, received(pool, 1, MIN_POOLED - 1))
    store.put(b"v" * 16, received(pool, 1, 2 * N)[:N])  # a view of another buffer's memory
    store.put(b"b" * 16, bytes(N))  # a frame read back from disk
    store.clear()
    assert pool.bytes == 0 and pool.kept == 0


def test_the_pool_keeps_only_what_the_budget_allows() -> None:
    store, pool, budget = pooled_store(cap=N * 5 // 2)
    for i in range(4):
        store.put(bytes([i]) * 16, received(pool, i))
    budget.used += N // 4  # a body being received holds some of the budget
    store.clear()
    assert pool.bytes == N * 2 and budget.used == N * 2 + N // 4
    assert pool.drop_all() == 2 * N and budget.used == N // 4


def test_a_body_waiting_for_budget_empties_the_pool() -> None:
    async def main() -> None:
        budget = ByteBudget(4 * N, reclaim=lambda: pool.drop_all())
        pool = BufferPool(budget.try_acquire, budget.release)
        store = MemoryStore(1 << 30)
        store.on_drop = pool.offer
        for i in range(3):
            store.put(bytes([i]) * 16, received(pool, i))
        store.clear()
        assert pool.bytes == budget.used == 3 * N
        await asyncio.wait_for(budget.acquire(3 * N + 1), 1.0)  # would wait behind the pool: it gives way
        assert pool.bytes == 0 and budget.used == 3 * N + 1
        store.put(b"x" * 16, received(pool, 1))
        store.clear()
        assert not pool.bytes  # no room left without waiting: freed, not kept

    asyncio.run(main())


@pytest.mark.slow
def test_server_reuses_buffers_and_serves_the_new_bytes(tmp_path: Path) -> None:
    spec = KVSpec(8, 4, 64, "float32", 16)  # 256 KiB frames
    first, second = make_frames(8, spec, seed=41), make_frames(8, spec, seed=42)
    with ServerProcess(tmp_path) as srv:
        tier = RemoteTier("127.0.0.1", srv.port, timeout_s=10.0)
        try:
            tier.put_many([(k, (f,)) for k, f in first])
            tier.clear()
            tier.put_many([(k, (f,)) for k, f in second])
            stats = stats_of(srv)
            assert stats["pool_reused"] >= 8, stats
            assert tier.get_many([k for k, _f in second]) == [f for _k, f in second]
            assert tier.get_many([k for k, _f in first]) == [None] * 8
            assert stats["inflight_bytes"] == 0  # kept buffers are not reported as bodies in flight
        finally:
            tier.close()
