"""Unit tests of the server protocol, store and client pieces (no processes)."""

from __future__ import annotations

import pytest
from server_support import make_frames

from kvtier import keys, wire
from kvtier.config import ServerConfig
from kvtier.errors import ConfigError, CorruptChunk, ProtocolError, TierUnavailable
from kvtier.server.app import authenticate, check_bind, identities, is_loopback
from kvtier.server.store import ENTRY_OVERHEAD, MemoryStore, namespace
from kvtier.storage import remote_protocol as P
from kvtier.storage.remote import RemoteTier


def test_protocol_keys_are_chunk_keys() -> None:
    assert P.KEY_BYTES == keys.KEY_BYTES


def test_check_frame_checks_structure_and_check_intact_the_checksum_too() -> None:
    (key, frame), (other, _f) = make_frames(2)
    wire.check_frame(frame, key)
    wire.check_frame(memoryview(frame), key)
    wire.check_intact(frame, key)
    flipped = bytearray(frame)
    flipped[len(frame) // 2] ^= 0x40  # a payload byte: only the checksum shows it
    wire.check_frame(bytes(flipped), key)
    with pytest.raises(CorruptChunk, match="checksum mismatch"):
        wire.check_intact(bytes(flipped), key)
    for bad, k in ((frame[:-1], key), (frame + b"x", key), (frame, other), (b"", key), (b"KVT1" + bytes(80), key)):
        for check in (wire.check_frame, wire.check_intact):
            with pytest.raises(CorruptChunk):
                check(bad, k)


def test_header_validation() -> None:
    raw = P.pack_header(P.Op.GET, 7, key_count=1, body_len=16)
    h = P.unpack_header(raw)
    assert (h.opcode, h.request_id, h.key_count, h.body_len) == (P.Op.GET, 7, 1, 16)
    for bad in (b"XXXX" + raw[4:], raw[:4] + b"\x02" + raw[5:], raw[:5] + b"\x63" + raw[6:], raw[:-1]):
        with pytest.raises(ProtocolError):
            P.unpack_header(bad)
    P.check_request_shape(h)
    for op, count, body in ((P.Op.GET, 2, 32), (P.Op.EXISTS, 2, 31), (P.Op.PUT, 1, 16), (P.Op.PING, 0, 1),
                            (P.Op.HELLO, 1, 0), (P.Op.DELETE, 0, 0)):
        with pytest.raises(ProtocolError):
            P.check_request_shape(P.unpack_header(P.pack_header(op, 1, key_count=count, body_len=body)))


def test_memory_store_never_exceeds_capacity() -> None:
    store = MemoryStore(10_000, "lru")
    for i in range(100):
        assert store.put(i.to_bytes(16, "little"), bytes(1000 + i))
        assert store.used_bytes <= store.capacity_bytes
    assert 0 < len(store) <= 10_000 // (1000 + ENTRY_OVERHEAD)
    assert store.get((99).to_bytes(16, "little")) is not None  # most recent survives
    assert store.get((0).to_bytes(16, "little")) is None  # oldest evicted
    assert not store.put(b"x" * 16, bytes(20_000))  # can never fit
    assert store.counters["evictions"] > 0
    n = len(store)
    assert store.clear() == n
    assert store.used_bytes == 0 and len(store) == 0


def test_memory_store_quota_evicts_only_the_tenants_own_chunks() -> None:
    store = MemoryStore(100_000, "lru")
    a, b = namespace("a"), namespace("b")
    assert store.put(a + bytes(16), bytes(1000))
    for i in range(10):
        assert store.put(b + i.to_bytes(16, "little"), bytes(1000), quota=3 * (1000 + ENTRY_OVERHEAD))
    assert store.ns_bytes[b] <= 3 * (1000 + ENTRY_OVERHEAD) and a + bytes(16) in store
    assert [b + i.to_bytes(16, "little") in store for i in range(10)] == [False] * 7 + [True] * 3
    evictions = store.counters["evictions"]
    assert not store.put(b + b"x" * 16, bytes(5000), quota=3 * (1000 + ENTRY_OVERHEAD))  # above the quota
    assert store.counters["evictions"] == evictions  # refused before evicting anything


def test_identities_and_their_config_errors_never_show_a_token() -> None:
    cfg = ServerConfig(tenants={"tok-a": "alpha", "tok-b": "beta"}, admin_token="tok-admin", token="tok-d")
    known = identities(cfg)
    assert authenticate(known, "tok-a") == ("alpha", False)
    assert authenticate(known, "tok-admin") == ("", True)
    assert authenticate(known, "tok-d") == ("", False)  # with tenants or an admin token, not admin
    assert authenticate(known, "tok-") is None and authenticate(known, "") is None
    assert authenticate(identities(ServerConfig(token="t")), "t") == ("", True)  # one trust domain
    for bad, match in (({"sekrit1": "../up"}, "tenant name"), ({"sekrit1": "x", "tok-admin": "y"}, "different"),
                       ({"": "x"}, "empty token")):
        with pytest.raises(ConfigError, match=match) as err:
            identities(ServerConfig(tenants=bad, admin_token="tok-admin"))
        assert "sekrit1" not in str(err.value) and "tok-admin" not in str(err.value)
    with pytest.raises(ConfigError, match="tenant_quotas"):
        identities(ServerConfig(tenants={"t": "x"}, tenant_quotas={"y": 10}))


def test_bind_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("")
    check_bind("127.0.0.1", "")
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ConfigError, match=r"server\.token"):
        check_bind("0.0.0.0", "")


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once closed


def test_remote_tier_without_server_raises_tier_unavailable_every_time() -> None:
    """No breaker inside the client: every call tries the server (after ``retries`` retries) and
    raises TierUnavailable; fast-failing is the caller's health state (next test)."""
    tier = RemoteTier("127.0.0.1", _dead_port(), timeout_s=1.0, retries=1)
    for _ in range(5):
        with pytest.raises(TierUnavailable):
            tier.get(b"k" * 16)
        with pytest.raises(TierUnavailable):
            tier.exists([b"k" * 16])
    assert tier.stats()["errors"] == 10 and tier.stats()["retries"] == 10
    assert "breaker_open" not in tier.stats()


def test_manager_backoff_is_the_only_fast_fail_for_a_dead_server() -> None:
    from server_support import SPEC

    from kvtier.storage.manager import StorageManager

    tier = RemoteTier("127.0.0.1", _dead_port(), timeout_s=1.0, retries=0)
    manager = StorageManager(SPEC, [(tier, "raw")], base_backoff_s=60.0)
    try:
        for _ in range(20):
            assert manager.locate([b"k" * 16]) == []
        assert tier.stats()["errors"] == 1  # one real try, then skipped while backing off
        assert manager.healthy() == {"remote": False}
    finally:
        manager.close()


def test_factory_builds_remote_tier_from_config() -> None:
    from server_support import SPEC

    from kvtier.config import load_config
    from kvtier.storage.factory import build_tiers

    cfg = load_config(environ={}, overrides={"remote": {"enabled": True, "port": 7999, "token": "t", "retries": 1,
                                                        "pool_size": 3}})
    (tier, codec), = build_tiers(cfg, SPEC)
    assert isinstance(tier, RemoteTier) and codec == "raw"
    assert (tier.host, tier.port, tier.token, tier.retries) == ("127.0.0.1", 7999, "t", 1)
    tier.close()
