"""P2P against hostile peers (loopback): a peer announcing and streaming 1.5 GiB costs the fetching
engine a counted miss and bounded memory; the P2P server answers GET/EXISTS only and requires its
token."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from server_attack import SPEC, FakePeer

from kvtier.cluster.p2p import PeerServer
from kvtier.errors import AuthError, TierUnavailable
from kvtier.keys import Chunker, Namespace
from kvtier.record import token_record
from kvtier.storage.cpu import CpuTier
from kvtier.storage.remote import Connection, RemoteTier

pytestmark = pytest.mark.slow

MiB = 1 << 20


def test_fake_peer_streaming_1_5_gib_is_a_bounded_counted_miss() -> None:
    with FakePeer(body_len=3 << 29) as peer:  # 1.5 GiB announced, streamed until the client hangs up
        code = f"""
            import resource
            from kvtier.cluster.p2p import PeerTier
            addr = "127.0.0.1:{peer.port}"
            tier = PeerTier(lambda keys: [[addr]] * len(keys), timeout_s=5.0)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            frame = tier.get(bytes(16))
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(frame is None, tier.stats().get("fetch_misses", 0), (after - before) // 1024)
        """
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        miss, misses, grew_mib = done.stdout.split()
        assert miss == "True" and int(misses) == 1
        assert int(grew_mib) < 256, f"client peak RSS grew by {grew_mib} MiB"
        assert peer.sent < 256 * MiB  # the client hung up instead of taking the stream


@pytest.fixture
def peer_server() -> tuple[PeerServer, bytes, bytes]:
    cpu = CpuTier(SPEC, 8 * SPEC.chunk_bytes)
    tokens = np.arange(SPEC.chunk_tokens, dtype=np.uint32)
    _arr, (chunk,) = Chunker(Namespace("p2p-sec", SPEC)).chunks(tokens)

    def fill(slots: list[int]) -> int:
        cpu.arena.view(slots[0]).copy_(torch.randn(SPEC.chunk_shape(SPEC.chunk_tokens)))
        return 1

    assert cpu.admit([token_record(chunk, tokens)], fill) not in ([], [None])
    server = PeerServer(cpu, token="peer-secret")
    server.start()
    yield server, chunk.key, b"\x05" * 16
    server.stop()


def test_p2p_server_answers_get_and_exists_only_to_token_holders(peer_server: tuple[PeerServer, bytes, bytes]) -> None:
    server, key, absent = peer_server
    tier = RemoteTier("127.0.0.1", server.port, "peer-secret", timeout_s=5.0, pool_size=1, retries=0)
    try:
        assert tier.exists([key, absent]) == [True, False]
        frame = tier.get(key)
        assert frame is not None and tier.get_many([key, absent]) == [frame, None]
        for refused in (tier.list_keys, tier.server_stats, tier.clear, lambda: tier.delete(key)):
            with pytest.raises(TierUnavailable, match="FORBIDDEN"):
                refused()
        tier.put(absent, frame)  # refused, counted, not raised (a put is never an outage)
        assert tier.stats()["puts_refused"] == 1
        assert tier.exists([key, absent]) == [True, False]  # nothing changed on the peer
    finally:
        tier.close()
    assert server.stats()["refused_forbidden"] >= 5
    with pytest.raises(AuthError):  # and only for holders of its token
        Connection("127.0.0.1", server.port, "wrong", 5.0)
    anonymous = RemoteTier("127.0.0.1", server.port, "", timeout_s=5.0, pool_size=1, retries=0)
    try:
        with pytest.raises(TierUnavailable):
            anonymous.get(key)
    finally:
        anonymous.close()

