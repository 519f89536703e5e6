"""PeerTier's own fast-fail: a peer that failed a fetch is skipped for PEER_COOLDOWN_S (the remote
client has no circuit breaker; the tier's caller owns health)."""

from __future__ import annotations

import socket

from kvtier.cluster.p2p import PeerTier


def test_a_dead_peer_is_a_miss_then_skipped_until_its_cooldown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once closed
    tier = PeerTier(lambda keys: [[dead]] * len(keys), timeout_s=1.0)
    try:
        key = b"k" * 16
        assert tier.get(key) is None
        assert tier.client(dead).stats()["errors"] == 1
        for _ in range(5):
            assert tier.get(key) is None  # skipped: no new connection attempt
        assert tier.client(dead).stats()["errors"] == 1
        assert tier.stats()["peer_failures"] == 1 and tier.stats()["peer_skipped"] == 5
        tier._down_until.clear()  # as if the cooldown ran out
        assert tier.get(key) is None
        assert tier.client(dead).stats()["errors"] == 2  # tried again
    finally:
        tier.close()
