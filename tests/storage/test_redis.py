"""RedisTier against real redis-server processes: a single node, a Sentinel, and a 3-master cluster.

Covers round trips (tier and CacheEngine), TTL expiry, keys spread over cluster masters, corruption
caught by the manager, and degradation when a server dies, hangs, or a cluster master dies (no
exception reaches the engine; hits resume after the server is back).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_support import RedisClusterProcs, RedisServer, free_port, redis_server_binary

if redis_server_binary() is None:
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)

import redis

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import TierUnavailable
from kvtier.layout import KVSpec
from kvtier.storage.factory import build_tiers
from kvtier.storage.redis import RedisTier

pytestmark = pytest.mark.slow

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    with RedisClusterProcs() as c:
        yield c


@pytest.fixture
def victim() -> Iterator[RedisServer]:
    """A server of its own, for tests that kill or pause it."""
    with RedisServer() as s:
        yield s


def keys(n: int, salt: int = 0) -> list[bytes]:
    return [bytes([salt, i % 256, i // 256]) * 5 + b"\x00" for i in range(n)]


def engine(url: str, mode: str = "single", promote: bool = True, **redis_over: object) -> CacheEngine:
    cfg = load_config(environ={}, overrides={
        "chunk_tokens": 16,
        "cpu": {"capacity": 64 * SPEC.chunk_bytes, "promote": promote},
        "redis": {"enabled": True, "url": url, "mode": mode, "timeout_s": 1.0,
                  "key_prefix": f"t{time.monotonic_ns()}:", **redis_over},
    })
    return CacheEngine(SPEC, "test-model", cfg)  # tiers come from the factory


def kv_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((SPEC.num_layers, 2, n, SPEC.num_kv_heads, SPEC.head_dim), generator=g)


def redis_stats(e: CacheEngine) -> dict[str, int | float]:
    return e.stats()["redis"]


def store_and_evict(e: CacheEngine, tokens: list[int], kv: torch.Tensor) -> None:
    assert e.store(tokens, kv) == len(tokens)
    assert e.storage.flush(10)
    e.cpu.clear()


# ---- single node ----------------------------------------------------------------------------------
def test_tier_round_trip(server: RedisServer) -> None:
    tier = RedisTier(server.url, key_prefix="rt:")
    ks = keys(20)
    frames = [bytes([i]) * (1000 + i) for i in range(20)]
    for k, f in zip(ks, frames):
        tier.put(k, f)
    assert tier.exists(ks + keys(3, salt=9)) == [True] * 20 + [False] * 3
    assert [tier.get(k) for k in ks] == frames
    assert tier.get(keys(1, salt=9)[0]) is None
    assert tier.delete(ks[0]) and not tier.delete(ks[0])
    raw = server.client()
    raw.set(b"other:key", b"x")  # clear() leaves keys outside its prefix alone
    assert tier.clear() == 19
    assert tier.exists(ks) == [False] * 20 and raw.get(b"other:key") == b"x"
    assert raw.get(b"rt:" + ks[1].hex().encode()) is None
    tier.close()


def test_large_value_round_trip(server: RedisServer) -> None:
    tier = RedisTier(server.url, key_prefix="big:")
    frame = torch.randint(0, 256, (16 << 20,), dtype=torch.uint8).numpy().tobytes()
    tier.put(keys(1)[0], frame)
    assert tier.get(keys(1)[0]) == frame
    tier.clear()


def test_put_parts_writes_one_value(server: RedisServer) -> None:
    payload = torch.arange(3000, dtype=torch.float32)
    strided = torch.arange(64, dtype=torch.int16)[::2]  # not contiguous: sent as a copy
    parts = (b"head", payload.numpy().data, strided.numpy().data)
    joined = b"head" + payload.numpy().tobytes() + strided.numpy().tobytes()
    for ttl in (0, 30):
        tier = RedisTier(server.url, key_prefix=f"parts{ttl}:", ttl_s=ttl)
        tier.put_parts(keys(1)[0], parts)
        assert tier.get(keys(1)[0]) == joined
        pttl = server.client().pttl(f"parts{ttl}:".encode() + keys(1)[0].hex().encode())
        assert (pttl == -1) if ttl == 0 else (0 < pttl <= 30_000)
        tier.put_parts(keys(1)[0], (b"x",))  # pipelined replies stay in step on the same connection
        assert tier.get(keys(1)[0]) == b"x" and tier.exists(keys(1)) == [True]
        tier.clear()


def test_batches_are_one_round_trip_each_and_exact(server: RedisServer) -> None:
    tier = RedisTier(server.url, key_prefix="batch:", ttl_s=30)
    ks = keys(12)
    items = [(k, (b"h%d" % i, memoryview(bytes([i]) * (5000 + i)))) for i, k in enumerate(ks)]
    raw = server.client()

    def calls(command: str) -> int:
        return int(raw.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    sets = calls("set")
    tier.put_many(items)
    assert calls("set") - sets == 12  # one SET each, pipelined
    assert 0 < raw.pttl(b"batch:" + ks[3].hex().encode()) <= 30_000
    gets, mgets = calls("get"), calls("mget")
    got = tier.get_many([*ks[:6], keys(1, salt=9)[0], *ks[6:]])
    assert calls("mget") - mgets == 1 and calls("get") == gets  # one MGET, no single GETs
    assert got == [b"h%d" % i + bytes([i]) * (5000 + i) for i in range(6)] + [None] + [
        b"h%d" % i + bytes([i]) * (5000 + i) for i in range(6, 12)]
    assert tier.get_many([]) == [] and tier.put_many([]) is None
    tier.clear()
    tier.close()


def test_server_refusal_is_unavailable(server: RedisServer) -> None:
    raw = server.client()
    raw.config_set("maxmemory", "1mb")
    try:
        tier = RedisTier(server.url, key_prefix="oom:")
        with pytest.raises(TierUnavailable, match=r"OOM|maxmemory"):
            tier.put(keys(1)[0], b"x" * (4 << 20))
        with pytest.raises(TierUnavailable, match=r"OOM|maxmemory"):
            tier.put_parts(keys(1)[0], (b"x" * (2 << 20), b"y" * (2 << 20)))
        assert tier.exists(keys(1)) == [False]  # the connection is still in step
    finally:
        raw.config_set("maxmemory", "0")


def test_engine_round_trip_hits_redis(server: RedisServer) -> None:
    e = engine(server.url)
    tokens = list(range(500, 560))  # 3 full chunks + a 12-token partial one
    kv = kv_for(60)
    store_and_evict(e, tokens, kv)
    assert len(e.cpu) == 0
    assert e.lookup(tokens) == 60
    out = torch.zeros_like(kv)
    assert e.retrieve(tokens, out) == 60
    assert torch.equal(out, kv)
    st = redis_stats(e)
    assert st["hits"] == 4 and st["writes"] == 4 and st.get("corrupt", 0) == 0
    e.close()


def test_engine_without_promotion_stages_redis_hits(server: RedisServer) -> None:
    """Redis cannot read into caller memory: without promotion its hits go through scratch, exact, and
    the CPU tier stays empty (a partial last chunk included)."""
    e = engine(server.url, promote=False)
    tokens = list(range(700, 760))
    kv = kv_for(60, seed=4)
    store_and_evict(e, tokens, kv)
    for _ in range(2):
        out = torch.zeros_like(kv)
        assert e.retrieve(tokens, out) == 60 and torch.equal(out, kv)
    assert len(e.cpu) == 0 and e.stats()["engine"]["staged_chunks"] == 8
    assert redis_stats(e)["hits"] == 8
    e.close()


def test_ttl_expiry(server: RedisServer) -> None:
    tier = RedisTier(server.url, key_prefix="ttl:", ttl_s=1)
    k = keys(1)[0]
    tier.put(k, b"frame")
    assert 0 < server.client().pttl(b"ttl:" + k.hex().encode()) <= 1000
    assert tier.get(k) == b"frame"
    deadline = time.monotonic() + 5
    while tier.get(k) is not None:
        assert time.monotonic() < deadline, "key did not expire"
        time.sleep(0.1)
    assert tier.exists([k]) == [False]


def test_corrupted_value_is_detected_counted_and_dropped(server: RedisServer) -> None:
    e = engine(server.url)
    tier = e.storage.slots[0].tier
    assert isinstance(tier, RedisTier)
    tokens = list(range(2000, 2032))
    kv = kv_for(32, seed=3)
    store_and_evict(e, tokens, kv)
    first = e.chunker.chunks(tokens)[1][0]
    name = tier.key_prefix.encode() + first.key.hex().encode()
    raw = server.client()
    value = raw.get(name)
    assert isinstance(value, bytes)
    pos = len(value) - 7  # a payload byte
    raw.setrange(name, pos, bytes([value[pos] ^ 0x40]))
    out = torch.zeros_like(kv)
    assert e.retrieve(tokens, out) == 0  # damaged first chunk: a miss, never returned
    assert torch.count_nonzero(out) == 0
    st = redis_stats(e)
    assert st["corrupt"] == 1 and st["discarded"] == 1
    assert raw.exists(name) == 0  # discarded from Redis
    e.close()


def test_redis_killed_then_restarted(victim: RedisServer) -> None:
    e = engine(victim.url)
    tokens = list(range(3000, 3064))
    kv = kv_for(64, seed=4)
    store_and_evict(e, tokens, kv)
    victim.kill()
    out = torch.zeros_like(kv)
    start = time.monotonic()
    for _ in range(20):  # keeps serving: misses, no exception, fast
        assert e.lookup(tokens) == 0
        assert e.retrieve(tokens, out) == 0
    assert e.store(tokens, kv) == 64  # CPU still works; the write-back fails or is skipped
    assert e.storage.flush(10)
    assert time.monotonic() - start < 3.0
    assert redis_stats(e)["healthy"] == 0
    e.cpu.clear()

    victim.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 15
    while not e.storage.healthy()["redis"]:
        assert time.monotonic() < deadline, "tier did not come back"
        e.lookup(tokens)
        time.sleep(0.1)
    store_and_evict(e, tokens, kv)
    assert e.retrieve(tokens, out) == 64 and torch.equal(out, kv)
    st = redis_stats(e)
    assert st["reconnects"] >= 1 and st["hits"] >= 4
    e.close()


def test_hung_redis_times_out(victim: RedisServer) -> None:
    tier = RedisTier(victim.url, key_prefix="hang:", timeout_s=0.3)
    tier.put(keys(1)[0], b"x")
    victim.pause()
    try:
        start = time.monotonic()
        with pytest.raises(TierUnavailable):
            tier.get(keys(1)[0])
        assert time.monotonic() - start < 2.0
    finally:
        victim.resume()
    assert tier.get(keys(1)[0]) == b"x"


def test_unreachable_at_start_is_unavailable_not_fatal() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for mode in ("single", "cluster"):
        tier = RedisTier(url, mode=mode, timeout_s=0.5)
        with pytest.raises(TierUnavailable):
            tier.exists(keys(2))
        with pytest.raises(TierUnavailable):
            tier.put(keys(1)[0], b"x")


def test_factory_builds_redis_tier(server: RedisServer) -> None:
    cfg = load_config(environ={}, overrides={"redis": {"enabled": True, "url": server.url, "ttl_s": 5,
                                                       "codec": "raw"}})
    [(tier, codec)] = build_tiers(cfg, SPEC)
    assert isinstance(tier, RedisTier) and codec == "raw" and tier.ttl_s == 5


# ---- sentinel -------------------------------------------------------------------------------------
@contextlib.contextmanager
def sentinel_for(master: RedisServer) -> Iterator[int]:
    port = free_port()
    conf = master.dir / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {master.dir}\n"
                    f"sentinel monitor kvmaster 127.0.0.1 {master.port} 1\n")
    proc = subprocess.Popen([master.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if probe.sentinel_get_master_addr_by_name("kvmaster"):
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "sentinel did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def test_sentinel_round_trip(server: RedisServer) -> None:
    with sentinel_for(server) as port:
        tier = RedisTier(f"redis://127.0.0.1:{port}/0", mode="sentinel", sentinel_master="kvmaster",
                         key_prefix="sent:")
        tier.put(keys(1)[0], b"via-sentinel")
        assert server.client().get(b"sent:" + keys(1)[0].hex().encode()) == b"via-sentinel"
        assert tier.get(keys(1)[0]) == b"via-sentinel"
        assert tier.clear() == 1
        tier.close()


# ---- cluster --------------------------------------------------------------------------------------
def test_cluster_keys_spread_over_all_masters(cluster: RedisClusterProcs) -> None:
    tier = RedisTier(cluster.url, mode="cluster", key_prefix="spread:")
    ks = keys(90)
    for i, k in enumerate(ks):
        tier.put(k, bytes([i]) * 100)
    per_node = [n.client().dbsize() for n in cluster.nodes]
    assert all(count > 0 for count in per_node) and sum(per_node) == 90, per_node
    assert tier.exists(ks + keys(5, salt=7)) == [True] * 90 + [False] * 5
    assert all(tier.get(k) == bytes([i]) * 100 for i, k in enumerate(ks))
    for i, k in enumerate(ks[:30]):  # the raw SET path goes to each key's own master
        tier.put_parts(k, (b"p", memoryview(bytes([i]) * 99)))
    assert all(tier.get(k) == b"p" + bytes([i]) * 99 for i, k in enumerate(ks[:30]))
    assert tier.delete(ks[0])
    assert tier.clear() == 89
    assert sum(n.client().dbsize() for n in cluster.nodes) == 0
    tier.close()


def test_cluster_batches_span_every_master(cluster: RedisClusterProcs) -> None:
    tier = RedisTier(cluster.url, mode="cluster", key_prefix="cbatch:")
    ks = keys(60)
    tier.put_many([(k, (b"c", bytes([i]) * 300)) for i, k in enumerate(ks)])
    assert all(n.client().dbsize() > 0 for n in cluster.nodes)  # pipelined per node, not all to one
    got = tier.get_many([*ks, keys(1, salt=3)[0]])
    assert got == [b"c" + bytes([i]) * 300 for i in range(60)] + [None]
    assert tier.clear() == 60
    tier.close()


def test_cluster_engine_round_trip(cluster: RedisClusterProcs) -> None:
    e = engine(cluster.url, mode="cluster")
    tokens = list(range(7000, 7160))  # 10 chunks
    kv = kv_for(160, seed=5)
    store_and_evict(e, tokens, kv)
    out = torch.zeros_like(kv)
    assert e.retrieve(tokens, out) == 160 and torch.equal(out, kv)
    assert redis_stats(e)["hits"] == 10
    e.clear()
    e.close()


def test_cluster_master_killed_degrades_then_recovers(cluster: RedisClusterProcs) -> None:
    """Last cluster test: it kills a master, then restarts it (the module fixture is whole again)."""
    e = engine(cluster.url, mode="cluster")
    tokens = list(range(9000, 9320))  # 20 chunks: some on every master
    kv = kv_for(320, seed=6)
    store_and_evict(e, tokens, kv)
    cluster.nodes[1].kill()
    out = torch.zeros_like(kv)
    start = time.monotonic()
    for _ in range(10):
        hit = e.retrieve(tokens, out)  # no exception; whatever is returned is exact
        assert hit < 320 and torch.equal(out[:, :, :hit], kv[:, :, :hit])
        e.cpu.clear()
        e.lookup(tokens)
    assert e.store(tokens, kv) == 320
    assert e.storage.flush(10)
    assert time.monotonic() - start < 5.0
    assert redis_stats(e)["errors"] >= 1

    cluster.restart(1)  # rejoins with its slots but no data
    e.cpu.clear()
    deadline = time.monotonic() + 20
    while True:
        e.lookup(tokens)
        if e.storage.healthy()["redis"]:
            e.store(tokens, kv)
            e.storage.flush(10)
            e.cpu.clear()
            if e.retrieve(tokens, out) == 320:
                break
        e.cpu.clear()
        assert time.monotonic() < deadline, "cluster hits did not resume"
        time.sleep(0.2)
    assert torch.equal(out, kv)
    e.clear()
    e.close()
