"""Helpers for the cache-server tests: a real ``kvtier server`` subprocess and real wire frames."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier.frames import pack
from kvtier.keys import Chunker, Namespace
from kvtier.layout import KVSpec
from kvtier.procs import Child, rss_bytes
from kvtier.record import token_record
from kvtier.storage import remote_protocol as P

SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)


class ServerProcess:
    """``python -m kvtier.server`` (the ``kvtier server`` command) on loopback; restartable on the same
    port. Settings not exposed as options go through ``KVTIER_SERVER__*`` environment variables."""

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", token: str = "", capacity: str = "64MiB",
                 persist: Path | None = None, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.token = token
        self.capacity = capacity
        self.persist = persist
        self.env = env or {}
        self.command = command or [sys.executable, "-m", "kvtier.server"]
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"
        self.starts = 0

    def args(self) -> list[str]:
        args = [*self.command, "--host", self.host, "--port", str(self.port), "--capacity", self.capacity,
                "--log-level", "warning"]
        if self.persist is not None:
            args += ["--persist", str(self.persist)]
        return args

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        """Start the server (on :attr:`port`, 0 = any free one) and wait for its address line; a server
        that exits or stays silent raises with its log (see :class:`kvtier.procs.Child`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        env.update(self.env)
        if self.token:
            env["KVTIER_SERVER__TOKEN"] = self.token
        self.starts += 1
        child = Child(self.args(), log=self.log, env=env)  # address line on stdout, logs on stderr
        self.proc = child.proc
        try:
            address = child.expect(r"listening on (\S+)", timeout_s).group(1)
        except TimeoutError:
            self.kill()
            raise
        self.port = int(address.rsplit(":", 1)[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        rss = rss_bytes(self.pid)
        assert rss is not None, f"no /proc/{self.pid}/statm"
        return rss

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def connect(self, timeout_s: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def make_frames(n: int, spec: KVSpec = SPEC, seed: int = 0, model: str = "test") -> list[tuple[bytes, bytes]]:
    """``n`` distinct ``(key, frame)`` pairs of real wire frames."""
    gen = torch.Generator().manual_seed(seed)
    tokens = np.arange(seed * 1_000_000, seed * 1_000_000 + n * spec.chunk_tokens, dtype=np.uint32)
    _arr, chunks = Chunker(Namespace(model, spec)).chunks(tokens)
    out = []
    for c in chunks:
        kv = torch.randn(spec.chunk_shape(c.num_tokens), generator=gen).to(spec.torch_dtype)
        out.append((c.key, pack(token_record(c, tokens), kv, spec)))
    return out


# ---- raw protocol client (for pipelining and malformed-input tests) -----------------------------------
def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += piece
    return bytes(out)


def read_reply(sock: socket.socket) -> tuple[P.Header, bytes]:
    h = P.unpack_header(recv_exact(sock, P.HEADER_BYTES))
    return h, recv_exact(sock, h.body_len)


def request(opcode: int, rid: int, body: bytes = b"", key_count: int = 0) -> bytes:
    return P.pack_header(opcode, rid, key_count=key_count, body_len=len(body)) + body


def hello(token: str = "", rid: int = 1) -> bytes:
    import msgspec

    return request(P.Op.HELLO, rid, msgspec.msgpack.encode(P.Hello(token=token, client="test")))


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes; raise TimeoutError if it does not within ``timeout_s``."""
    sock.settimeout(timeout_s)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        if not piece:
            return bytes(out)
        out += piece
        if time.monotonic() > deadline:
            raise TimeoutError("server kept the connection open")


def stats_of(server: ServerProcess, token: str = "") -> dict[str, Any]:
    from kvtier.storage.remote import RemoteTier

    tier = RemoteTier("127.0.0.1", server.port, token or server.token, timeout_s=5.0, pool_size=1)
    try:
        return tier.server_stats()
    finally:
        tier.close()


# ---- relays between a client and a real server (damage in transit) ------------------------------------
class CuttingProxy:
    """A loopback TCP relay to ``port`` that closes its first connection once it relayed ``cut`` bytes
    from the server to the client (later connections are relayed whole; every one with ``every``)."""

    def __init__(self, port: int, cut: int, *, every: bool = False) -> None:
        self.port, self.cut, self.every = port, cut, every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> int:
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.accepted += 1
            self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        limit = self.cut if self.accepted == 1 or self.every else None
        for src, dst, cap in ((client, upstream, None), (upstream, client, limit)):
            threading.Thread(target=self._pump, args=(src, dst, cap, (client, upstream)), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, cap: int | None, both: tuple[socket.socket, ...]) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while cap is None or sent < cap:
                data = src.recv(min(65536, cap - sent) if cap is not None else 65536)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        for sock in both:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


class FlippingProxy(CuttingProxy):
    """A loopback TCP relay to ``port`` that inverts one byte of the server-to-client stream: the last
    byte of the first occurrence of ``marker`` (damage in transit; the server's stored frame is intact)."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.marker, self.flipped = marker, 0
        super().__init__(port, cut=0)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, upstream, None, (client, upstream)), daemon=True).start()
        threading.Thread(target=self._flip, args=(upstream, client), daemon=True).start()

    def _flip(self, src: socket.socket, dst: socket.socket) -> None:
        tail = b""  # the bytes before ``data``, enough to find a marker cut across two reads
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                found = (tail + data).find(self.marker)
                if found >= 0 and not self.flipped:
                    buf = bytearray(data)
                    buf[found + len(self.marker) - 1 - len(tail)] ^= 0xFF
                    data = bytes(buf)
                    self.flipped += 1
                dst.sendall(data)
                tail = (tail + data)[-(len(self.marker) - 1) :]
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
