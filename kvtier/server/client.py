"""``RemoteTier``: the :class:`~kvtier.storage.base.Tier` backed by a ``kvtier server``.

Synchronous on purpose (the engine and the storage manager are threads): a pool of blocking TCP
sockets, each used by one thread at a time.

Invariants:
- A connection is used by one request/response exchange (or one pipelined batch) at a time and is
  closed on any error, timeout or reply that does not match its request (id and opcode), so a
  connection's byte stream can never be out of step with its requests.
- A failed call is retried ``retries`` times with exponential backoff on a fresh connection (pooled
  idle connections are dropped too: after a server restart they are all dead). Timeouts are not
  retried: they already cost ``timeout_s``.
- Circuit breaker: after a call fails for good, calls raise :class:`TierUnavailable` at once for a
  cooldown (``breaker_cooldown_s``, doubling per failure up to ``max_cooldown_s``); then one call
  probes the server; success closes the breaker. So while the server is down every call is a fast
  miss, and the tier reconnects by itself when the server is back.
- Public methods raise only :class:`TierUnavailable` (the Tier contract). A PUT the server refuses
  (corrupt frame, frame above its limits) is counted and dropped, not raised: it is not an outage.
- Reads use kernel socket timeouts on blocking sockets, so one ``recv(n, MSG_WAITALL)`` receives a
  whole GET frame straight into the ``bytes`` object returned (no copy); headers and other bodies are
  received with ``recv_into`` into the connection's preallocated buffers. Sends are one ``sendmsg``
  of header, key and frame parts (a tensor-backed payload view is sent without joining).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import msgspec

from kvtier.config import RemoteConfig
from kvtier.errors import AuthError, ProtocolError, TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.server import protocol as P
from kvtier.storage.base import Tier

log = logging.getLogger(__name__)

T = TypeVar("T")
EXISTS_BATCH = 4096  # keys per EXISTS / DELETE message (64 KiB)
_enc = msgspec.msgpack.Encoder()
_info = msgspec.msgpack.Decoder(P.ServerInfo)
_stats = msgspec.msgpack.Decoder(dict[str, int | float])
_Body = bytes | bytearray | memoryview


class _Dropped(Exception):
    """The server closed the connection on purpose (BUSY, SHUTTING_DOWN, ...): retry elsewhere."""


class _Refused(Exception):
    """The server refused a PUT (CORRUPT, REFUSED, TOO_LARGE): nothing to retry."""

    def __init__(self, message: str, *, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed  # the server closed the connection after refusing


class Connection:
    """One blocking socket to the server, authenticated at creation.

    Timeouts are kernel socket timeouts (``SO_RCVTIMEO`` / ``SO_SNDTIMEO``) on a blocking socket rather
    than Python's poll-then-recv timeouts, so one ``recv(..., MSG_WAITALL)`` can take a whole frame.
    """

    def __init__(self, host: str, port: int, token: str, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            self.sock.settimeout(None)
            seconds = int(timeout_s)
            micros = max(int((timeout_s - seconds) * 1e6), 0 if seconds else 1)  # 0/0 would mean "forever"
            tv = struct.pack("ll", seconds, micros)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._hdr = bytearray(P.HEADER_BYTES)
            self._hdr_view = memoryview(self._hdr)
            self._buf = bytearray(64 * 1024)
            self._view = memoryview(self._buf)
            self._rid = 0
            self.max_body = 1 << 31
            hello = _enc.encode(P.Hello(token=token, client=f"kvtier/{os.getpid()}"))
            h, body = self.call(P.Op.HELLO, (hello,))
            if h.status in (P.Status.AUTH_FAILED, P.Status.AUTH_REQUIRED):
                raise AuthError(f"server {host}:{port} refused the token: {bytes(body).decode(errors='replace')}")
            _check_status(h, body)
            self.info = _info.decode(body)
            self.max_body = self.info.max_message_bytes
        except BaseException:
            self.sock.close()
            raise

    def send(self, opcode: int, parts: Sequence[_Body], key_count: int = 0) -> int:
        """Send one request (header and body parts in one ``sendmsg``, no joining); return its id."""
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        views = [v for v in (byte_view(p) for p in parts) if v.nbytes]
        body_len = sum(v.nbytes for v in views)
        views.insert(0, memoryview(P.pack_header(opcode, self._rid, key_count=key_count, body_len=body_len)))
        while views:
            try:
                sent = self.sock.sendmsg(views)
            except BlockingIOError as exc:  # SO_SNDTIMEO expired
                raise TimeoutError("timed out sending to the cache server") from exc
            while sent:
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        return self._rid

    def _recv_exact(self, view: memoryview) -> None:
        while len(view):
            try:
                n = self.sock.recv_into(view, len(view), socket.MSG_WAITALL)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise TimeoutError("timed out waiting for the cache server") from exc
            if n == 0:
                raise ConnectionError("server closed the connection")
            view = view[n:]

    def _recv_bytes(self, size: int) -> bytes:
        """``size`` bytes as a new ``bytes`` object received in place (no copy on the usual path)."""
        pieces: list[bytes] = []
        left = size
        while left:
            try:
                piece = self.sock.recv(left, socket.MSG_WAITALL)
            except BlockingIOError as exc:
                raise TimeoutError("timed out waiting for the cache server") from exc
            if not piece:
                raise ConnectionError("server closed the connection")
            pieces.append(piece)
            left -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def recv(self, expect_rid: int, expect_op: int, *, fresh: bool = False) -> tuple[P.Header, _Body]:
        """Read one response. The body is a view of the connection's buffer, valid until the next
        ``recv``, or with ``fresh`` (for frames) a ``bytes`` object the caller owns."""
        self._recv_exact(self._hdr_view)
        h = P.unpack_header(self._hdr)
        if h.request_id != expect_rid or h.opcode != expect_op:
            if h.status in P.CLOSING and h.request_id == 0:  # refused at accept (BUSY / shutting down)
                raise _Dropped(f"server refused the connection: {P.Status(h.status).name}")
            raise ProtocolError(f"reply to request {h.request_id} (op {h.opcode}) while waiting for "
                                f"request {expect_rid} (op {expect_op})")
        if h.body_len > max(self.max_body, P.MAX_ERROR_BYTES) + P.HEADER_BYTES:
            raise ProtocolError(f"reply body of {h.body_len} bytes exceeds the server's own limit")
        if fresh and h.status == P.Status.OK:
            return h, self._recv_bytes(h.body_len)
        if h.body_len > len(self._buf):
            self._buf = bytearray(h.body_len)
            self._view = memoryview(self._buf)
        body = self._view[: h.body_len]
        self._recv_exact(body)
        return h, body

    def call(self, opcode: int, parts: Sequence[_Body] = (), key_count: int = 0, *,
             fresh: bool = False) -> tuple[P.Header, _Body]:
        return self.recv(self.send(opcode, parts, key_count), opcode, fresh=fresh)

    def close(self) -> None:
        self.sock.close()


def byte_view(part: _Body) -> memoryview:
    """A flat byte view of ``part`` (a tensor-backed memoryview may have another format or shape)."""
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_status(h: P.Header, body: _Body, *, put: bool = False) -> None:
    """Raise for a non-OK status (NOT_FOUND is handled by the caller)."""
    if h.status in (P.Status.OK, P.Status.NOT_FOUND):
        return
    status = P.Status(h.status) if h.status in P.Status._value2member_map_ else h.status
    message = bytes(body[: P.MAX_ERROR_BYTES]).decode("utf-8", "replace")
    name = getattr(status, "name", str(status))
    if h.status in (P.Status.AUTH_FAILED, P.Status.AUTH_REQUIRED):
        raise AuthError(f"server: {name}: {message}")
    if put and h.status in (P.Status.CORRUPT, P.Status.REFUSED, P.Status.TOO_LARGE):
        raise _Refused(f"{name}: {message}", closed=h.status in P.CLOSING)
    if h.status in P.CLOSING:
        raise _Dropped(f"server closed the connection: {name}: {message}")
    raise ProtocolError(f"unexpected status {name}: {message}")


class CircuitBreaker:
    """Closed -> open (fail fast for a cooldown) -> one probe -> closed or open again."""

    def __init__(self, cooldown_s: float = 0.1, max_cooldown_s: float = 2.0) -> None:
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.failures = 0
        self.open_until = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def before(self) -> None:
        """Raise :class:`TierUnavailable` if calls must fail fast now."""
        if not self.failures:
            return
        with self._lock:
            if not self.failures:
                return
            now = time.monotonic()
            if now < self.open_until or self._probing:
                wait = max(0.0, self.open_until - now)
                raise TierUnavailable(f"cache server unavailable (circuit open, next probe in {wait:.2f}s)")
            self._probing = True

    def success(self) -> None:
        if self.failures or self._probing:
            with self._lock:
                self.failures = 0
                self._probing = False

    def release_probe(self) -> None:
        """The probing call ended without reaching the server; let the next call probe."""
        with self._lock:
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._probing = False
            delay = min(self.max_cooldown_s, self.cooldown_s * 2 ** (self.failures - 1))
            self.open_until = time.monotonic() + delay

    @property
    def probing(self) -> bool:
        return self._probing


class RemoteTier(Tier):
    """Client of one ``kvtier server``; thread-safe."""

    name = "remote"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7390,
        token: str = "",
        timeout_s: float = 2.0,
        pool_size: int = 4,
        *,
        retries: int = 2,
        backoff_s: float = 0.01,
        breaker_cooldown_s: float = 0.1,
        max_cooldown_s: float = 2.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.host, self.port, self.token = host, port, token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = CircuitBreaker(breaker_cooldown_s, max_cooldown_s)
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: RemoteConfig) -> RemoteTier:
        """Build from the ``remote`` config section."""
        return cls(cfg.host, cfg.port, cfg.token, cfg.timeout_s, cfg.pool_size, retries=cfg.retries,
                   breaker_cooldown_s=cfg.breaker_cooldown_s)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # ---- pool ------------------------------------------------------------------------------------
    def _checkout(self) -> Connection:
        if not self._slots.acquire(timeout=self.timeout_s):
            raise TierUnavailable(f"no free connection to {self.host}:{self.port} within {self.timeout_s}s")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            conn = Connection(self.host, self.port, self.token, self.timeout_s)
        except BaseException:
            self._slots.release()
            raise
        self._count("connects")
        return conn

    def _checkin(self, conn: Connection, ok: bool) -> None:
        if ok and not self._closed:
            self._idle.put(conn)
        else:
            conn.close()
        self._slots.release()

    def _drop_idle(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def _run(self, op: str, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a pooled connection with retries and the circuit breaker."""
        if self._closed:
            raise TierUnavailable("remote tier is closed")
        self.breaker.before()
        attempts = 1 if self.breaker.probing else self.retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                self._count("retries")
            conn: Connection | None = None
            ok = False
            try:
                conn = self._checkout()
                result = fn(conn)
                ok = True
            except TierUnavailable:  # pool exhausted: not the server's fault
                self.breaker.release_probe()
                raise
            except _Refused as exc:
                ok = not exc.closed
                self.breaker.success()
                raise
            except AuthError as exc:
                last = exc
                break
            except (OSError, ProtocolError, _Dropped) as exc:
                last = exc
                self._drop_idle()  # after a restart every pooled connection is dead
                if isinstance(exc, TimeoutError):
                    break
                continue
            finally:
                if conn is not None:
                    self._checkin(conn, ok)
            self.breaker.success()
            return result
        self.breaker.failure()
        self._count("errors")
        if isinstance(last, AuthError):
            log.error("cache server %s:%d: %s", self.host, self.port, last)
        raise TierUnavailable(f"cache server {self.host}:{self.port} {op} failed: {last}") from last

    # ---- Tier ------------------------------------------------------------------------------------
    def put(self, key: ChunkKey, frame: bytes) -> None:
        self.put_parts(key, (frame,))

    def put_parts(self, key: ChunkKey, parts: Sequence[bytes | memoryview]) -> None:
        _check_key(key)
        size = sum(byte_view(p).nbytes for p in parts)

        def call(conn: Connection) -> None:
            if size + P.KEY_BYTES > conn.max_body:
                raise _Refused(f"frame of {size} bytes exceeds the server limit of {conn.max_body}")
            h, body = conn.call(P.Op.PUT, (key, *parts), key_count=1)
            _check_status(h, body, put=True)

        try:
            self._run("put", call)
        except _Refused as exc:
            self._count("puts_refused")
            log.debug("cache server refused chunk %s: %s", key.hex(), exc)
            return
        self._count("puts")
        self._count("bytes_put", size)

    def get(self, key: ChunkKey) -> bytes | None:
        _check_key(key)

        def call(conn: Connection) -> bytes | None:
            h, body = conn.call(P.Op.GET, (key,), key_count=1, fresh=True)
            _check_status(h, body)
            return None if h.status == P.Status.NOT_FOUND else _owned(body)

        frame = self._run("get", call)
        self._count("hits" if frame is not None else "misses")
        if frame is not None:
            self._count("bytes_got", len(frame))
        return frame

    def _keyed(self, opcode: int, keys: Sequence[ChunkKey]) -> list[bool]:
        out: list[bool] = []
        for key in keys:
            _check_key(key)
        for i in range(0, len(keys), EXISTS_BATCH):
            batch = list(keys[i : i + EXISTS_BATCH])
            body_keys = b"".join(batch)

            def call(conn: Connection, n: int = len(batch), data: bytes = body_keys) -> list[bool]:
                h, body = conn.call(opcode, (data,), key_count=n)
                _check_status(h, body)
                if len(body) != n:
                    raise ProtocolError(f"{n} keys answered with {len(body)} bytes")
                return [b != 0 for b in body]

            out.extend(self._run(P.Op(opcode).name.lower(), call))
        return out

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self._keyed(P.Op.EXISTS, keys) if keys else []

    def delete(self, key: ChunkKey) -> bool:
        return self._keyed(P.Op.DELETE, [key])[0]

    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self._keyed(P.Op.DELETE, keys) if keys else []

    def clear(self) -> int:
        def call(conn: Connection) -> int:
            h, body = conn.call(P.Op.CLEAR)
            _check_status(h, body)
            return int(msgspec.msgpack.decode(body, type=dict[str, int])["removed"])

        return self._run("clear", call)

    # ---- extras ----------------------------------------------------------------------------------
    def ping(self) -> float:
        """Round-trip seconds of one PING."""

        def call(conn: Connection) -> float:
            start = time.perf_counter()
            h, body = conn.call(P.Op.PING)
            _check_status(h, body)
            return time.perf_counter() - start

        return self._run("ping", call)

    def list_keys(self, page: int = 65536) -> list[ChunkKey]:
        """Every key on the server, in byte order (fetched in pages)."""
        out: list[ChunkKey] = []
        after = b""
        while True:
            req = _enc.encode(P.ListRequest(after=after, limit=page))

            def call(conn: Connection, data: bytes = req) -> tuple[list[bytes], bool]:
                h, body = conn.call(P.Op.LIST, (data,))
                _check_status(h, body)
                return P.split_keys(body, h.key_count), bool(h.flags & P.FLAG_MORE)

            keys, more = self._run("list", call)
            out.extend(keys)
            if not more or not keys:
                return out
            after = keys[-1]

    def server_stats(self) -> dict[str, int | float]:
        def call(conn: Connection) -> dict[str, int | float]:
            h, body = conn.call(P.Op.STATS)
            _check_status(h, body)
            return _stats.decode(body)

        return self._run("stats", call)

    def put_many(self, items: Iterable[tuple[ChunkKey, bytes]], window: int = 32) -> int:
        """Pipelined PUTs on one connection (at most ``window`` unanswered); return how many stored."""
        batch = list(items)

        def call(conn: Connection) -> int:
            stored = 0
            pending: list[int] = []
            for key, frame in batch:
                if len(frame) + P.KEY_BYTES > conn.max_body:
                    continue  # the server would refuse it and close the connection
                pending.append(conn.send(P.Op.PUT, (key, frame), key_count=1))
                if len(pending) >= window:
                    stored += _put_reply(conn, pending.pop(0))
            while pending:
                stored += _put_reply(conn, pending.pop(0))
            return stored

        stored = self._run("put_many", call)
        self._count("puts", stored)
        self._count("puts_refused", len(batch) - stored)
        return stored

    def get_each(self, keys: Sequence[ChunkKey], fn: Callable[[int, bytes | None], None], window: int = 32) -> int:
        """Pipelined GETs on one connection: ``fn(i, frame_or_None)`` for each key as its reply arrives
        (so the caller can consume and drop each frame); return the number of hits. After a retry
        ``fn`` may see an index again."""

        def call(conn: Connection) -> int:
            hits = 0
            pending: list[tuple[int, int]] = []

            def take() -> None:
                nonlocal hits
                i, rid = pending.pop(0)
                h, body = conn.recv(rid, P.Op.GET, fresh=True)
                _check_status(h, body)
                frame = None if h.status == P.Status.NOT_FOUND else _owned(body)
                hits += frame is not None
                fn(i, frame)

            for i, key in enumerate(keys):
                pending.append((i, conn.send(P.Op.GET, (key,), key_count=1)))
                if len(pending) >= window:
                    take()
            while pending:
                take()
            return hits

        hits = self._run("get_many", call)
        self._count("hits", hits)
        self._count("misses", len(keys) - hits)
        return hits

    def get_many(self, keys: Sequence[ChunkKey], window: int = 32) -> list[bytes | None]:
        """Pipelined GETs on one connection, results in order."""
        out: list[bytes | None] = [None] * len(keys)

        def keep(i: int, frame: bytes | None) -> None:
            out[i] = frame

        self.get_each(keys, keep, window)
        return out

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = dict(self.counters)
        out["breaker_open"] = int(self.breaker.failures > 0)
        out["idle_connections"] = self._idle.qsize()
        return out

    def close(self) -> None:
        self._closed = True
        self._drop_idle()


def _check_key(key: bytes) -> None:
    if len(key) != P.KEY_BYTES:
        raise ValueError(f"chunk keys are {P.KEY_BYTES} bytes, got {len(key)}")


def _owned(body: _Body) -> bytes:
    return body if isinstance(body, bytes) else bytes(body)


def _put_reply(conn: Connection, rid: int) -> int:
    h, body = conn.recv(rid, P.Op.PUT)
    try:
        _check_status(h, body, put=True)
    except _Refused:
        return 0
    return 1


__all__ = ["CircuitBreaker", "Connection", "RemoteTier"]
