"""Helpers for the hostile-client tests of the cache server, P2P server and disk tier: the real server
subprocess and frame helpers of ``tests/server``, plus raw-socket attackers (loopback only)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_support import (
    SPEC,
    ServerProcess,
    hello,
    make_frames,
    read_reply,
    recv_exact,
    request,
)

from kvtier.storage import remote_protocol as P

__all__ = ["SPEC", "FakePeer", "ServerProcess", "hello", "make_frames", "read_reply", "recv_exact", "request"]


class FakePeer:
    """A hostile 'cache server' on loopback: answers HELLO announcing a huge message limit, then answers
    every GET/MGET with a header announcing ``body_len`` bytes and streams zeros until the client hangs
    up. It is the attacker of the test (a real socket peer), not a mock of kvtier."""

    def __init__(self, body_len: int, announced_limit: int = 1 << 31) -> None:
        self.body_len = body_len
        self.announced_limit = announced_limit
        self.sent = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakePeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        zeros = bytes(1 << 20)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        h = P.unpack_header(recv_exact(conn, P.HEADER_BYTES))
                        recv_exact(conn, h.body_len)
                        if h.opcode == P.Op.HELLO:
                            info = msgspec.msgpack.encode(P.ServerInfo(P.VERSION, False, self.announced_limit,
                                                                       1 << 40, False))
                            conn.sendall(P.pack_header(h.opcode, h.request_id, body_len=len(info)) + info)
                            continue
                        conn.sendall(P.pack_header(h.opcode, h.request_id, body_len=self.body_len))
                        left = self.body_len
                        while left:
                            n = conn.send(zeros[: min(left, len(zeros))])
                            left -= n
                            self.sent += n
                except OSError:
                    continue


def put_header(rid: int, key: bytes, frame_len: int) -> bytes:
    """A PUT header announcing a ``frame_len``-byte frame, followed by its key (no frame bytes)."""
    return P.pack_header(P.Op.PUT, rid, key_count=1, body_len=P.KEY_BYTES + frame_len) + key
