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
- No circuit breaker here: a call that fails for good raises :class:`TierUnavailable`, and the
  caller's health state decides when to try again (the
  :class:`~kvtier.storage.manager.StorageManager` backs the tier off; P2P skips a failed peer for a
  while). The next call after an outage simply connects afresh.
- Public methods raise only :class:`TierUnavailable` (the Tier contract). A PUT the server refuses
  (malformed frame, frame above its limits or quota, persistence refused it) is counted
  (``puts_refused``) and dropped, not raised: it is not an outage.
- Replies are bounded by this client's own ``max_reply_bytes``, never by the limit the server
  announces: a larger reply header closes the connection before any of its body is read, and a reply
  must arrive within ``timeout_s`` plus its size at 100 MB/s, so a hostile or broken server can neither
  exhaust this process's memory nor hold a call for ever (both are failed calls, i.e. misses).
- ``get_many`` / ``get_each`` / ``get_each_into(_parts)`` / ``put_many`` use the batched MGET / MPUT ops: one
  request for many keys, replies streamed and each frame received into its own ``bytes`` object (or
  its payload straight into the caller's buffer) and handed over as it arrives.
- Reads use kernel socket timeouts on blocking sockets, so one ``recv(n, MSG_WAITALL)`` receives a
  whole GET frame straight into the ``bytes`` object returned (no copy); headers and other bodies are
  received with ``recv_into`` into the connection's preallocated buffers. Sends are one ``sendmsg``
  of header, key and frame parts (a tensor-backed payload view is sent without joining).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import msgspec

from kvtier import batching, wire
from kvtier.backoff import Backoff
from kvtier.config import RemoteConfig
from kvtier.errors import AuthError, CorruptChunk, ProtocolError, TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.storage import remote_protocol as P
from kvtier.storage.base import ScatteredTier
from kvtier.storage.remote_protocol import byte_view

log = logging.getLogger(__name__)

T = TypeVar("T")
EXISTS_BATCH = 4096  # keys per EXISTS / DELETE / MGET message (64 KiB)
MPUT_BATCH = 64  # items per MPUT message
MIN_RATE = 100e6  # bytes/s a reply must at least arrive at, on top of timeout_s
DEFAULT_MAX_REPLY = 512 << 20
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

    def __init__(self, host: str, port: int, token: str, timeout_s: float,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY) -> None:
        self.timeout_s = timeout_s
        self.max_reply = max(max_reply_bytes, P.MAX_ERROR_BYTES)
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
            self.max_body = P.PRE_AUTH_MAX_BODY  # what the server accepts from us (from its HELLO reply)
            hello = _enc.encode(P.Hello(token=token, client=f"kvtier/{os.getpid()}"))
            h, body = self.call(P.Op.HELLO, (hello,))
            if h.status in (P.Status.AUTH_FAILED, P.Status.AUTH_REQUIRED):
                raise AuthError(f"server {host}:{port} refused the token: {bytes(body).decode(errors='replace')}")
            _check_status(h, body)
            self.info = _info.decode(body)
            self.max_body = self.info.max_message_bytes  # only ever used to avoid sending what it refuses
        except BaseException:
            self.sock.close()
            raise

    def send(self, opcode: int, parts: Sequence[_Body], key_count: int = 0) -> int:
        """Send one request (header and body parts in one ``sendmsg``, no joining); return its id."""
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        body_len = sum(byte_view(p).nbytes for p in parts)
        head = P.pack_header(opcode, self._rid, key_count=key_count, body_len=body_len)
        try:
            P.send_parts(self.sock, [head, *parts])
        except BlockingIOError as exc:  # SO_SNDTIMEO expired
            raise TimeoutError("timed out sending to the cache server") from exc
        return self._rid

    def _deadline(self, size: int) -> float:
        return time.monotonic() + self.timeout_s + size / MIN_RATE

    def _recv_exact(self, view: memoryview) -> None:
        deadline = self._deadline(len(view))
        while len(view):
            try:
                n = self.sock.recv_into(view, len(view), socket.MSG_WAITALL)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise TimeoutError("timed out waiting for the cache server") from exc
            if n == 0:
                raise ConnectionError("server closed the connection")
            view = view[n:]
            if len(view) and time.monotonic() > deadline:  # a trickle: each recv returned something
                raise TimeoutError("the cache server sends too slowly")

    def _recv_bytes(self, size: int) -> bytes:
        """``size`` bytes as a new ``bytes`` object received in place (no copy on the usual path)."""
        pieces: list[bytes] = []
        left = size
        deadline = self._deadline(size)
        while left:
            try:
                piece = self.sock.recv(left, socket.MSG_WAITALL)
            except BlockingIOError as exc:
                raise TimeoutError("timed out waiting for the cache server") from exc
            if not piece:
                raise ConnectionError("server closed the connection")
            pieces.append(piece)
            left -= len(piece)
            if left and time.monotonic() > deadline:
                raise TimeoutError("the cache server sends too slowly")
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _reply_header(self, expect_rid: int, expect_op: int) -> P.Header:
        """The next reply header, checked against the request it must answer and this client's cap."""
        self._recv_exact(self._hdr_view)
        h = P.unpack_header(self._hdr)
        if h.request_id != expect_rid or h.opcode != expect_op:
            if h.status in P.CLOSING and h.request_id == 0:  # refused at accept (BUSY / shutting down)
                raise _Dropped(f"server refused the connection: {P.Status(h.status).name}")
            raise ProtocolError(f"reply to request {h.request_id} (op {h.opcode}) while waiting for "
                                f"request {expect_rid} (op {expect_op})")
        if h.body_len > self.max_reply:
            raise ProtocolError(f"reply body of {h.body_len} bytes exceeds this client's limit of {self.max_reply}")
        return h

    def recv(self, expect_rid: int, expect_op: int, *, fresh: bool = False) -> tuple[P.Header, _Body]:
        """Read one response. The body is a view of the connection's buffer, valid until the next
        ``recv``, or with ``fresh`` (for frames) a ``bytes`` object the caller owns. A body above this
        client's ``max_reply`` raises :class:`ProtocolError` before any of it is read."""
        h = self._reply_header(expect_rid, expect_op)
        if fresh and h.status == P.Status.OK:
            return h, self._recv_bytes(h.body_len)
        if h.body_len > len(self._buf):
            self._buf = bytearray(h.body_len)
            self._view = memoryview(self._buf)
        body = self._view[: h.body_len]
        self._recv_exact(body)
        return h, body

    def recv_into(self, expect_rid: int, expect_op: int,
                  parts: Sequence[memoryview]) -> tuple[P.Header, bytes | None]:
        """Read one frame reply, its payload straight into ``parts`` (buffers filled in order, zero
        copy) and return the head (wire header + metadata, unverified). The head is ``None`` when the
        reply is not OK or the frame's payload is not exactly the parts' total size; its body is then
        consumed through the connection's scratch buffer, ``parts`` are untouched, and the connection
        stays in step. A reply whose length disagrees with its frame header's lengths raises
        :class:`ProtocolError` (the caller drops the connection): nothing larger than the reply's
        frame header announced is ever received, into the parts or anywhere else."""
        h = self._reply_header(expect_rid, expect_op)
        fixed = wire.HEADER_BYTES
        if h.status != P.Status.OK or h.body_len < fixed:
            body = self._view[: min(h.body_len, len(self._buf))]
            self._recv_exact(body)
            self._skip(h.body_len - len(body))
            _check_status(h, body)
            return h, None
        head = bytearray(fixed)
        self._recv_exact(memoryview(head))
        try:
            header = wire.read_header(head)
        except CorruptChunk:  # not a frame: the caller's fallback read reports it
            header = None
        if header is not None and fixed + header.meta_len + header.payload_len != h.body_len:
            raise ProtocolError(f"reply of {h.body_len} bytes holds a frame of "
                                f"{fixed + header.meta_len + header.payload_len}")
        views = [v for v in (byte_view(p) for p in parts) if v.nbytes]
        if header is None or header.payload_len != sum(v.nbytes for v in views):
            self._skip(h.body_len - fixed)
            return h, None
        head += bytes(header.meta_len)
        self._recv_exact(memoryview(head)[fixed:])
        if len(views) == 1:
            self._recv_exact(views[0])
        else:
            self._recv_views(views)
        return h, bytes(head)

    def _recv_views(self, views: list[memoryview]) -> None:
        """Fill ``views`` in order with ``recvmsg_into`` (at most ``IOV_MAX`` buffers a call), under
        the same deadline as :meth:`_recv_exact`."""
        deadline = self._deadline(sum(v.nbytes for v in views))
        while views:
            try:
                n = self.sock.recvmsg_into(views[: P.IOV_MAX], 0, socket.MSG_WAITALL)[0]
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise TimeoutError("timed out waiting for the cache server") from exc
            if n == 0:
                raise ConnectionError("server closed the connection")
            wire.advance(views, n)
            if views and time.monotonic() > deadline:
                raise TimeoutError("the cache server sends too slowly")

    def _skip(self, n: int) -> None:
        """Receive and drop ``n`` bytes (through the scratch buffer)."""
        while n:
            piece = self._view[: min(n, len(self._buf))]
            self._recv_exact(piece)
            n -= len(piece)

    def call(self, opcode: int, parts: Sequence[_Body] = (), key_count: int = 0, *,
             fresh: bool = False) -> tuple[P.Header, _Body]:
        return self.recv(self.send(opcode, parts, key_count), opcode, fresh=fresh)

    def close(self) -> None:
        self.sock.close()


def _check_status(h: P.Header, body: _Body, *, put: bool = False) -> None:
    """Raise for a non-OK status (NOT_FOUND is handled by the caller)."""
    if h.status in (P.Status.OK, P.Status.NOT_FOUND):
        return
    status = P.Status(h.status) if h.status in P.Status._value2member_map_ else h.status
    message = bytes(body[: P.MAX_ERROR_BYTES]).decode("utf-8", "replace")
    name = getattr(status, "name", str(status))
    if h.status in (P.Status.AUTH_FAILED, P.Status.AUTH_REQUIRED):
        raise AuthError(f"server: {name}: {message}")
    if h.status == P.Status.FORBIDDEN or (put and h.status in (P.Status.CORRUPT, P.Status.REFUSED,
                                                                 P.Status.TOO_LARGE)):
        raise _Refused(f"{name}: {message}", closed=h.status in P.CLOSING)
    if h.status in P.CLOSING:
        raise _Dropped(f"server closed the connection: {name}: {message}")
    raise ProtocolError(f"unexpected status {name}: {message}")


class RemoteTier(ScatteredTier):
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
        max_reply_bytes: int = DEFAULT_MAX_REPLY,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.host, self.port, self.token = host, port, token
        self.max_reply_bytes = max_reply_bytes
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: RemoteConfig) -> RemoteTier:
        """Build from the ``remote`` config section."""
        return cls(cfg.host, cfg.port, cfg.token, cfg.timeout_s, cfg.pool_size, retries=cfg.retries,
                   max_reply_bytes=cfg.max_reply_bytes)

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
            conn = Connection(self.host, self.port, self.token, self.timeout_s, self.max_reply_bytes)
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

    def _run(self, op: str, fn: Callable[[Connection], T], *, refusable: bool = False) -> T:
        """Run ``fn`` on a pooled connection with retries. A refusal (a PUT the server would not store,
        or an opcode this identity may not use) is not an outage: it raises ``_Refused`` where
        ``refusable``, else :class:`TierUnavailable`."""
        if self._closed:
            raise TierUnavailable("remote tier is closed")
        last: BaseException | None = None
        retry = Backoff(self.backoff_s, math.inf)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(retry.failed())
                self._count("retries")
            conn: Connection | None = None
            ok = False
            try:
                conn = self._checkout()
                result = fn(conn)
                ok = True
            except _Refused as exc:
                ok = not exc.closed
                if refusable:
                    raise
                raise TierUnavailable(f"cache server {self.host}:{self.port} refused {op}: {exc}") from exc
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
            return result
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
            self._run("put", call, refusable=True)
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

    def list_keys(self, page: int = 65536, tenant: str = "") -> list[ChunkKey]:
        """Every key of ``tenant`` on the server, in byte order (fetched in pages; needs the admin
        token where the server has one)."""
        out: list[ChunkKey] = []
        after = b""
        while True:
            req = _enc.encode(P.ListRequest(after=after, limit=page, tenant=tenant))

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

    def put_many(self, items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        """Store every ``(key, frame parts)`` item with batched MPUTs (one message per at most
        :data:`MPUT_BATCH` items whose frames together fit the server's message limit, so the server
        receives each message in one pass; all sent before the replies are read). Refused items are
        counted (``puts_refused``), as with :meth:`put`."""
        batch = []
        for key, parts in items:
            _check_key(key)
            views = [v for v in (byte_view(p) for p in parts) if v.nbytes]
            batch.append((key, views, sum(v.nbytes for v in views)))
        if not batch:
            return

        def call(conn: Connection) -> list[bool]:
            sendable = [i for i, item in enumerate(batch) if item[2] + P.KEY_BYTES <= conn.max_body]
            sent: list[tuple[int, list[int]]] = []
            for group in batching.cut(sendable, MPUT_BATCH, conn.max_body, lambda i: batch[i][2]):
                parts: list[_Body] = []
                for i in group:
                    key, views, size = batch[i]
                    parts.append(P.MPUT_ITEM.pack(key, size))
                    parts.extend(views)
                sent.append((conn.send(P.Op.MPUT, parts, key_count=len(group)), group))
            stored = [False] * len(batch)
            for rid, group in sent:
                h, body = conn.recv(rid, P.Op.MPUT)
                _check_status(h, body)
                if len(body) != len(group):
                    raise ProtocolError(f"MPUT of {len(group)} items answered with {len(body)} statuses")
                for i, status in zip(group, bytes(body), strict=True):
                    stored[i] = status == P.Status.OK
            return stored

        outcome = self._run("put_many", call)
        done = sum(outcome)
        self._count("puts", done)
        self._count("puts_refused", len(outcome) - done)
        self._count("bytes_put", sum(size for (_k, _v, size), ok in zip(batch, outcome, strict=True) if ok))

    def get_each(self, keys: Sequence[ChunkKey], fn: Callable[[int, bytes | None], None]) -> int:
        """Batched GET (MGET, :data:`EXISTS_BATCH` keys per message): ``fn(i, frame_or_None)`` for each
        key as its frame arrives (so the caller can verify and copy frame i while i+1 is on the wire,
        and drop it); return the number of hits. After a retry ``fn`` may see an index again."""
        for key in keys:
            _check_key(key)

        def call(conn: Connection) -> int:
            hits = 0
            for start in range(0, len(keys), EXISTS_BATCH):
                batch = keys[start : start + EXISTS_BATCH]
                rid = conn.send(P.Op.MGET, (b"".join(batch),), key_count=len(batch))
                for i in range(len(batch)):
                    h, body = conn.recv(rid, P.Op.MGET, fresh=True)
                    _check_status(h, body)
                    if h.key_count != i or bool(h.flags & P.FLAG_MORE) != (i + 1 < len(batch)):
                        raise ProtocolError(f"MGET item {h.key_count} (flags {h.flags}) while expecting {i}")
                    frame = None if h.status == P.Status.NOT_FOUND else _owned(body)
                    hits += frame is not None
                    fn(start + i, frame)
            return hits

        hits = self._run("get_many", call) if keys else 0
        self._count("hits", hits)
        self._count("misses", len(keys) - hits)
        return hits

    def get_into_parts(self, key: ChunkKey, parts: Sequence[memoryview]) -> bytes | memoryview | None:
        heads: list[bytes | memoryview | None] = [None]
        self.get_each_into_parts([key], [parts], heads.__setitem__)
        return heads[0]

    def get_each_into_parts(self, keys: Sequence[ChunkKey], payloads: Sequence[Sequence[memoryview]],
                            fn: Callable[[int, bytes | memoryview | None], None]) -> None:
        """Batched zero-copy GET (MGET): the payload of ``keys[i]`` is received straight into the
        buffers ``payloads[i]`` (filled in order; their total must be exactly its size) and ``fn(i,
        head)`` called as soon as it is there (head: wire header + metadata, unverified, see
        :func:`kvtier.frames.unpack_head_into`; ``None`` for a miss or a size mismatch, that payload
        then untouched), while the next frames are still arriving. ``fn`` sees each index once, in
        order: a retry after a failure mid-way asks only for the keys not handed over yet. An
        exception from ``fn`` drops the connection (its reply stream is not read to the end) and
        propagates. After a failure a payload not handed over may hold partial bytes of a frame."""
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys but {len(payloads)} payload destinations")
        for key in keys:
            _check_key(key)
        done = 0  # keys handed to fn
        hits = 0

        def call(conn: Connection) -> None:
            nonlocal done, hits
            while done < len(keys):
                start = done
                batch = keys[start : start + EXISTS_BATCH]
                rid = conn.send(P.Op.MGET, (b"".join(batch),), key_count=len(batch))
                for i in range(len(batch)):
                    h, head = conn.recv_into(rid, P.Op.MGET, payloads[start + i])
                    if h.key_count != i:
                        raise ProtocolError(f"MGET item {h.key_count} while expecting {i}")
                    done += 1
                    hits += head is not None
                    fn(start + i, head)

        try:
            if keys:
                self._run("get_many", call)
        finally:
            self._count("hits", hits)
            self._count("gets_zero_copy", hits)
            self._count("misses", done - hits)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | memoryview | None]:
        """Batched GET: the frames of ``keys`` in order (``None`` = miss)."""
        out: list[bytes | memoryview | None] = [None] * len(keys)

        def keep(i: int, frame: bytes | None) -> None:
            out[i] = frame

        self.get_each(keys, keep)
        return out

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = dict(self.counters)
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


__all__ = ["Connection", "RemoteTier"]
