"""≥10,000 random and mutated messages at a real server: no crash, no hang, bounded memory."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import ServerProcess, hello, make_frames, read_reply, read_until_closed, request

from kvtier.storage import remote_protocol as P

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
EXAMPLES = 1_500  # each sends 4-12 messages over 4 connections: >= 10,000 messages in all
(KEY, FRAME), = make_frames(1, seed=21)
VALID = [
    hello(TOKEN),
    request(P.Op.PING, 3),
    request(P.Op.PUT, 4, KEY + FRAME, key_count=1),
    request(P.Op.GET, 5, KEY, key_count=1),
    request(P.Op.EXISTS, 6, KEY * 3, key_count=3),
    request(P.Op.DELETE, 7, KEY, key_count=1),
    request(P.Op.LIST, 8, msgspec.msgpack.encode(P.ListRequest(limit=5))),
    request(P.Op.LIST, 9),
    request(P.Op.STATS, 10),
]


def _expand(family: int, seed: int, extra: bytes) -> bytes:
    """One message from a small hypothesis-drawn recipe (cheap to draw, wide to expand)."""
    rnd = random.Random(seed)
    if family == 0:  # noise
        return rnd.randbytes(rnd.choice([0, 1, 7, 23, 24, 25, 100])) + extra
    if family == 1:  # a header with arbitrary fields, mostly a valid magic
        length = rnd.choice([0, 1, 15, 16, 17, 48, rnd.randrange(1 << 17), (1 << 32) - 1, 1 << 63, (1 << 64) - 1])
        header = struct.pack(
            "<4sBBBBIIQ", rnd.choice([P.MAGIC, P.MAGIC, P.MAGIC, b"KVS0", bytes(4)]), rnd.choice([1, 1, 1, 0, 2, 255]),
            rnd.randrange(13), rnd.randrange(256), rnd.randrange(256), rnd.randrange(1 << 32),
            rnd.choice([0, 1, 2, 3, rnd.randrange(1 << 32)]), length)
        return header + extra[: min(length, len(extra))]
    base = rnd.choice(VALID)
    if family == 3:
        return base
    data = bytearray(base)  # family 2: a valid request with flipped bytes, cut short or extended
    for _ in range(rnd.randrange(1, 5)):
        pos = rnd.randrange(len(data)) if rnd.random() < 0.7 else rnd.randrange(min(len(data), P.HEADER_BYTES + 48))
        data[pos] ^= rnd.randrange(1, 256)
    if rnd.random() < 0.3:
        data = data[: rnd.randrange(len(data) + 1)]
    return bytes(data) + (extra if rnd.random() < 0.3 else b"")


recipe = st.tuples(st.integers(0, 3), st.integers(0, (1 << 64) - 1), st.binary(max_size=64))
# per example: 4 concurrent connections, each optionally authenticated, each carrying 1-3 messages
connections = st.lists(st.tuples(st.booleans(), st.lists(recipe, min_size=1, max_size=3)), min_size=4, max_size=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"KVTIER_SERVER__MAX_MESSAGE_BYTES": "128KiB", "KVTIER_SERVER__MAX_INFLIGHT_BYTES": "1MiB",
           "KVTIER_SERVER__READ_TIMEOUT_S": "5", "KVTIER_SERVER__MAX_CONNECTIONS": "64"}
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    with ServerProcess(workdir, host="0.0.0.0", token=TOKEN, capacity="4MiB", env=env) as srv:
        yield srv


def _ping(srv: ServerProcess) -> None:
    with srv.connect() as sock:
        sock.sendall(request(P.Op.PING, 77))
        h, _body = read_reply(sock)
        assert (h.request_id, h.status) == (77, P.Status.OK)


def test_fuzzed_messages_never_hurt_the_server(server: ServerProcess) -> None:
    _ping(server)
    rss_start = server.rss()
    sent = [0, 0]  # messages, examples

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(conns=connections)
    def attack(conns: list[tuple[bool, list[tuple[int, int, bytes]]]]) -> None:
        socks = [server.connect() for _ in conns]
        try:
            for sock, (authenticate, recipes) in zip(socks, conns, strict=True):
                payload = (hello(TOKEN) if authenticate else b"") + b"".join(_expand(*r) for r in recipes)
                try:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the server may close early on a bad header; that is allowed
                sent[0] += len(recipes)
            for sock in socks:
                read_until_closed(sock, 10.0)  # raises if the server neither answers nor closes: a hang
        finally:
            for sock in socks:
                sock.close()
        sent[1] += 1
        if sent[1] % 250 == 0:
            assert server.alive()
            _ping(server)

    attack()
    assert sent[0] >= 10_000
    assert server.alive()
    _ping(server)
    rss_end = server.rss()
    # store cap 4 MiB + in-flight cap 1 MiB + per-connection buffers; allow allocator slack
    assert rss_end - rss_start < 48 << 20, (rss_start, rss_end)
    with server.connect() as sock:
        sock.sendall(hello(TOKEN) + request(P.Op.STATS, 2))
        read_reply(sock)
        stats = msgspec.msgpack.decode(read_reply(sock)[1])
    assert stats["connections_total"] >= 4 * EXAMPLES
    assert stats.get("server_errors", 0) == 0  # every bad input was handled, none crashed a handler
    assert stats["store_bytes_memory"] <= 4 << 20
    seen = ("protocol_errors", "refused_oversize", "refused_unauthenticated", "auth_failures", "refused_corrupt",
            "op_put", "op_get", "timeouts")
    print(f"{sent[0]} messages on {4 * sent[1]} connections; RSS +{(rss_end - rss_start) >> 10} KiB;",
          {k: stats.get(k, 0) for k in seen})
