"""Unit tests of the router's choice, backoff and prefix table (no processes)."""

from __future__ import annotations

import time

import pytest

from kvtier.router.policy import Backend, Chooser, Pool
from kvtier.router.prefix import PrefixTable


def _pool(n: int = 3) -> Pool:
    return Pool([Backend(f"http://b{i}", f"i{i}") for i in range(n)], base_backoff_s=0.5, max_backoff_s=2.0)


def test_kv_prefers_longest_hit_then_least_loaded() -> None:
    pool = _pool()
    b0, b1, b2 = pool.backends
    kv = Chooser("kv")
    assert kv.pick(pool.backends, {b0.url: 32, b1.url: 64}).backend is b1
    d = kv.pick(pool.backends, {b1.url: 64}, source="table")
    assert d.reason == "table_hit" and d.hit_tokens == 64
    b0.inflight, b1.inflight = 3, 1
    equal = {b0.url: 64, b1.url: 64}
    assert all(kv.pick(pool.backends, equal).backend is b1 for _ in range(5))  # tie: fewer in flight
    b2.inflight = 0
    miss = kv.pick(pool.backends, {})
    assert miss.backend is b2 and miss.reason == "miss"
    assert kv.pick(pool.backends, None).reason == "untokenized"
    assert kv.pick([b0], {b1.url: 64}).backend is b0  # only candidates are ever chosen


def test_load_ties_rotate_and_roundrobin_cycles() -> None:
    pool = _pool()
    ll = Chooser("least_loaded")
    assert {ll.pick(pool.backends).backend.url for _ in range(3)} == {b.url for b in pool.backends}
    rr = Chooser("roundrobin")
    pool.backends[0].inflight = 10  # ignored by round-robin
    assert [rr.pick(pool.backends).backend.url for _ in range(6)] == [b.url for b in pool.backends] * 2
    with pytest.raises(ValueError, match="unknown routing policy"):
        Chooser("random")  # type: ignore[arg-type]


def test_failed_backend_backs_off_exponentially_and_recovers() -> None:
    pool = _pool(2)
    b0 = pool.backends[0]
    assert pool.failed(b0) == 0.5 and pool.failed(b0) == 1.0 and pool.failed(b0) == 2.0 and pool.failed(b0) == 2.0
    assert pool.eligible() == [pool.backends[1]]
    assert pool.eligible({pool.backends[1].url}) == []
    b0.backoff.retry_at = time.monotonic() - 0.01  # backoff over: it is tried again
    assert b0 in pool.eligible()
    pool.succeeded(b0)
    assert b0.backoff.failures == 0 and pool.failed(b0) == 0.5


def test_prefix_table_longest_common_chunk_run_per_backend() -> None:
    table = PrefixTable(chunk_tokens=4, max_keys=100)
    doc = list(range(100, 120))  # 5 chunks
    table.record(table.keys(doc), "A")
    table.record(table.keys(doc[:8]), "B")
    assert table.match(table.keys([*doc, 1, 2]), ["A", "B"]) == {"A": 20, "B": 8}
    assert table.match(table.keys(doc[:10]), ["A", "B"]) == {"A": 8, "B": 8}  # partial chunk never counts
    assert table.match(table.keys(doc), ["B"]) == {"B": 8}
    other = [7, *doc[1:]]  # differs in the first token: nothing in common
    assert table.match(table.keys(other), ["A", "B"]) == {}


def test_prefix_table_is_bounded_lru() -> None:
    table = PrefixTable(chunk_tokens=2, max_keys=6)
    old, new = [1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]
    table.record(table.keys(old), "A")
    table.record(table.keys(new), "B")
    assert len(table) == 6
    assert table.match(table.keys(old), ["A"]) == {"A": 6}  # refreshes old's keys
    table.record(table.keys([40, 41, 42, 43]), "C")  # evicts the 2 least recently used: new's first chunks
    assert len(table) == 6
    assert table.match(table.keys(new), ["B"]) == {}
    assert table.match(table.keys(old), ["A"]) == {"A": 6}


def test_prefix_table_chunks_like_an_engine_with_the_same_config() -> None:
    """No chunk_tokens anywhere: the table chunks by 128 tokens, as the vLLM connector on CPU does (a
    prompt sharing 200 tokens is credited 128, where 256-token chunks credited nothing); a chunk_tokens
    set in the config (override or environment) is the table's too."""
    from kvtier.config import MIN_DEFAULT_CHUNK, load_config
    from kvtier.router.app import Router

    def make(**config: object) -> Router:
        return Router(load_config(environ=env, overrides={"router": {"backends": ["http://b0"]}, **config}))

    env: dict[str, str] = {}
    router = make()
    table = router.kv.table
    assert table.chunk_tokens == MIN_DEFAULT_CHUNK == 128
    sent = list(range(1000, 1300))
    router.kv.record(sent, "http://b0")
    assert table.match(table.keys([*sent[:200], *range(7, 107)]), ["http://b0"]) == {"http://b0": 128}
    assert make(chunk_tokens=256).kv.table.chunk_tokens == 256
    env["KVTIER_CHUNK_TOKENS"] = "64"
    assert make().kv.table.chunk_tokens == 64
