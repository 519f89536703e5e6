"""``kvtier server``: an asyncio cache server for wire frames (protocol in :mod:`kvtier.server.protocol`).

Invariants:
- Binds 127.0.0.1 by default and refuses (``ConfigError``) any non-loopback address without a token.
  With a token, a connection must authenticate (HELLO, compared with :func:`hmac.compare_digest`)
  before any command but PING; before that its bodies are capped at ``PRE_AUTH_MAX_BODY``.
- A header is validated before its body is read; a body above ``max_message_bytes`` is refused.
  Malformed input gets one error reply and closes *that* connection; nothing a peer sends stops the
  server or another connection.
- Memory is bounded: the store holds at most ``capacity`` bytes; request bodies being read or processed
  plus GET responses not yet taken by the kernel hold at most ``max_inflight_bytes`` (a reader waits
  for budget, which back-pressures its client through TCP); each connection has one fixed 64 KiB
  scratch buffer; at most ``max_connections`` connections exist (more get BUSY and are closed).
- A PUT frame is verified (wire header, lengths, xxh3 checksum, key) before it is stored; corrupt puts
  are refused with CORRUPT and nothing changes.
- Responses on a connection are written in request order (pipelining).
- On SIGTERM/SIGINT: stop accepting, close idle connections, let requests in progress finish (up to
  ``shutdown_grace_s``), then close the store (persisted data is on disk) and return.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from kvtier import wire
from kvtier.config import ServerConfig
from kvtier.errors import ConfigError, CorruptChunk, KvtierError, ProtocolError
from kvtier.server import protocol as P
from kvtier.server.store import ChunkStore

log = logging.getLogger(__name__)

SCRATCH_BYTES = 64 * 1024
SMALL_BODY = 16 * 1024  # bodies up to this size are read through the scratch buffer
WRITE_SLICE = 256 * 1024  # largest piece of a response handed to the transport at once
DIRECT_IO = 256 * 1024  # bodies at least this large move through a worker thread's socket calls
_hello = msgspec.msgpack.Decoder(P.Hello)
_list_req = msgspec.msgpack.Decoder(P.ListRequest)
_enc = msgspec.msgpack.Encoder()


class _Closed(Exception):
    """The peer closed the connection (or it was closed under us)."""


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, token: str) -> None:
    """Raise :class:`ConfigError` if binding ``host`` without ``token`` would expose the cache."""
    if not token and not is_loopback(host):
        raise ConfigError(
            f"server.host is {host!r}, which is not a loopback address; set server.token (or --token / "
            "KVTIER_SERVER__TOKEN) so clients must authenticate, or bind 127.0.0.1"
        )


class ByteBudget:
    """FIFO counting semaphore over bytes: ``acquire(n)`` waits until ``used + n <= cap``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int) -> None:
        if n > self.cap:
            raise ProtocolError(f"{n} bytes exceed the in-flight cap of {self.cap}")
        if not self._waiters and self.used + n <= self.cap:
            self._take(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted and cancelled at the same time
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.cap:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self._take(n)
                fut.set_result(None)


class Connection(asyncio.BufferedProtocol):
    """One client connection: a scratch buffer for small reads, direct ``recv_into`` for large bodies.

    The kernel writes into :meth:`get_buffer`'s view: the free tail of the scratch buffer, or, while
    :meth:`read_into` is waiting, the unfilled part of the caller's destination (no extra copy of a
    frame). Reading pauses whenever the scratch buffer is full, so an unread backlog never grows.

    Large bodies (PUT frames in, GET frames out) move through a worker thread doing plain socket calls
    on a duplicate of the connection's descriptor: C-level ``sendall`` / ``recv_into`` loops are about
    twice as fast as asyncio's per-readiness Python callbacks. While a thread owns the socket the
    transport neither reads (reading is paused) nor writes (its buffer was drained first and nothing is
    written until the thread is done), so the byte stream stays in order. The duplicate is closed only
    when no thread uses it (a cancelled transfer is woken with ``shutdown`` first).
    """

    def __init__(self, server: CacheServer) -> None:
        self.server = server
        self.buf = bytearray(SCRATCH_BYTES)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.target: memoryview | None = None  # set while read_into waits; None once it is full
        self.target_got = 0
        self.closed = False
        self.busy = False  # between a request's header and its response
        self.authed = not server.token
        self.peer = ""
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self._dup: socket.socket | None = None
        self._io: asyncio.Future[None] | None = None

    # ---- protocol callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=0, low=0)  # pause_writing whenever anything is queued
        self.task = self.server.accept(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.target is not None:
            return self.target[self.target_got :]
        if self.end == len(self.buf):
            self._compact()
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.server.counters["bytes_in"] += nbytes
        if self.target is not None:
            self.target_got += nbytes
            if self.target_got == len(self.target):
                self.target = None  # later bytes go to the scratch buffer, never an empty view
                self._wake()
            return
        self.end += nbytes
        if self.end == len(self.buf):
            self._compact()
            if self.end == len(self.buf):
                self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True  # no more input; keep the transport open to answer what is buffered
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ---- helpers ---------------------------------------------------------------------------------
    def _compact(self) -> None:
        if self.start:
            n = self.end - self.start
            self.buf[:n] = self.view[self.start : self.end]
            self.start, self.end = 0, n

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise _Closed
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    @property
    def buffered(self) -> int:
        return self.end - self.start

    # ---- reads (called by the handler coroutine only) --------------------------------------------
    async def read_exact(self, n: int) -> bytes:
        """The next ``n`` bytes (``n <= SCRATCH_BYTES``)."""
        while self.end - self.start < n:
            if len(self.buf) - self.start < n:
                self._compact()
            self._resume()
            await self._wait()
        out = bytes(self.view[self.start : self.start + n])
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        self._resume()
        return out

    async def read_into(self, dest: memoryview) -> None:
        """Fill ``dest`` completely: buffered bytes first, then straight from the socket."""
        take = min(self.buffered, len(dest))
        dest[:take] = self.view[self.start : self.start + take]
        self.start += take
        if self.start == self.end:
            self.start = self.end = 0
        if take == len(dest):
            self._resume()
            return
        rest = dest[take:]
        if len(rest) >= DIRECT_IO and self._thread_socket() is not None:
            self._pause()  # the transport must not read while the thread does
            await self._in_thread(_recv_exact, rest)
            self.server.counters["bytes_in"] += len(rest)
            self._resume()
            return
        self.target, self.target_got = rest, 0
        try:
            self._resume()
            while self.target is not None:
                await self._wait()
        finally:
            self.target = None

    # ---- writes ----------------------------------------------------------------------------------
    def write(self, *parts: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.closed or self.transport.is_closing():
            return
        for part in parts:
            if len(part):
                self.transport.write(part)
                self.server.counters["bytes_out"] += len(part)

    # ---- large bodies through a worker thread ----------------------------------------------------
    def _thread_socket(self) -> socket.socket | None:
        if self._dup is None and self.server.io_pool is not None and self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is None or self.closed:
                return None
            self._dup = socket.socket(fileno=os.dup(sock.fileno()))
            self._dup.settimeout(self.server.config.read_timeout_s)
        return self._dup

    async def _in_thread(self, fn: Callable[[socket.socket, Any], None], arg: Any) -> None:
        """Run ``fn(dup_socket, arg)`` in the I/O pool; socket errors close the connection."""
        dup = self._thread_socket()
        assert dup is not None and self.server.io_pool is not None
        fut = asyncio.get_running_loop().run_in_executor(self.server.io_pool, fn, dup, arg)
        self._io = fut
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)  # wake the thread; it fails at once
            await asyncio.wait([fut], timeout=5.0)
            raise
        except TimeoutError:
            raise
        except OSError as exc:
            raise _Closed from exc
        finally:
            self._io = None
            if self.closed:
                self._close_dup()

    def _close_dup(self) -> None:
        if self._dup is not None and self._io is None:
            self._dup.close()
            self._dup = None

    async def send(self, parts: list[Any], timeout_s: float) -> None:
        """Write a response. Large ones go through :meth:`_in_thread` (after asyncio's buffer drained);
        others go to the transport in slices of :data:`WRITE_SLICE`, waiting for the kernel to take
        each slice that did not go out at once (asyncio 3.11 shifts a large unsent remainder after
        every ``send``, which is quadratic; slices keep it small)."""
        total = sum(len(p) for p in parts)
        if total >= DIRECT_IO and self._thread_socket() is not None:
            async with asyncio.timeout(timeout_s):
                await self.drain()
            if self.closed:
                raise _Closed
            await self._in_thread(_send_parts, parts)
            self.server.counters["bytes_out"] += total
            return
        for part in parts:
            view = memoryview(part)
            for i in range(0, len(view), WRITE_SLICE):
                self.write(view[i : i + WRITE_SLICE])
                if self._write_paused:
                    async with asyncio.timeout(timeout_s):
                        await self.drain()

    async def drain(self) -> None:
        """Wait until asyncio's write buffer is empty (the kernel has taken everything)."""
        while self._write_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True
        self._wake()
        if self._io is not None and self._dup is not None:
            with contextlib.suppress(OSError):
                self._dup.shutdown(socket.SHUT_RDWR)  # the thread fails; _in_thread closes the dup
        self._close_dup()


def _send_parts(sock: socket.socket, parts: list[Any]) -> None:
    for part in parts:
        sock.sendall(part)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection mid-message")
        view = view[n:]


# status, body parts, key count, flags, budget bytes to release once the response is drained
Reply = tuple[P.Status, list[Any], int, int, int]


class CacheServer:
    """The server object; :meth:`start` binds, :meth:`shutdown` drains. One event loop, one thread."""

    def __init__(self, config: ServerConfig, store: ChunkStore | None = None) -> None:
        check_bind(config.host, config.token)
        if config.max_message_bytes > config.max_inflight_bytes:
            raise ConfigError(
                f"server.max_message_bytes ({config.max_message_bytes}) must not exceed "
                f"server.max_inflight_bytes ({config.max_inflight_bytes})"
            )
        self.config = config
        self.token = config.token
        self.store = store if store is not None else build_store(config)
        self.counters: Counter[str] = Counter()
        self.connections: set[Connection] = set()
        self.closing = False
        self.started = time.monotonic()
        self.port = 0
        self._budget: ByteBudget | None = None
        self.io_pool = (ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvtier-server-io")
                        if config.io_threads else None)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def budget(self) -> ByteBudget:
        if self._budget is None:
            self._budget = ByteBudget(self.config.max_inflight_bytes)
        return self._budget

    async def start(self) -> int:
        """Bind and listen; return the port (useful with port 0)."""
        _raise_fd_limit(3 * self.config.max_connections + 64)  # socket + duplicate per connection, files
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), self.config.host, self.config.port, reuse_address=True, backlog=512
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("kvtier server listening on %s:%d", self.config.host, self.port)
        return self.port

    def accept(self, conn: Connection) -> asyncio.Task[None] | None:
        self.counters["connections_total"] += 1
        if self.closing or len(self.connections) >= self.config.max_connections:
            status = P.Status.SHUTTING_DOWN if self.closing else P.Status.BUSY
            self.counters["connections_refused"] += 1
            msg = P.error_body(f"server refuses connection: {status.name.lower()} "
                               f"({len(self.connections)}/{self.config.max_connections} connections)")
            conn.write(P.pack_header(P.Op.PING, 0, status=status, body_len=len(msg)), msg)
            conn.close()
            return None
        self.connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- per-connection loop ---------------------------------------------------------------------
    async def _serve(self, conn: Connection) -> None:
        cfg = self.config
        header: P.Header | None = None
        try:
            while not self.closing:
                header = None
                # unauthenticated peers get the short timeout, so idle strangers cannot hold connection slots
                idle = conn.buffered == 0 and conn.authed
                timeout = cfg.idle_timeout_s if idle else cfg.read_timeout_s
                async with asyncio.timeout(timeout):
                    raw = await conn.read_exact(P.HEADER_BYTES)
                conn.busy = True
                header = P.unpack_header(raw)
                status, parts, count, flags, hold = await self._request(conn, header)
                try:
                    body_len = sum(len(p) for p in parts)
                    head = P.pack_header(header.opcode, header.request_id, status=status, flags=flags,
                                         key_count=count, body_len=body_len)
                    await conn.send([head, *parts], cfg.read_timeout_s)
                finally:
                    if hold:
                        self.budget.release(hold)
                if status in P.CLOSING:
                    break
                conn.busy = False
        except _Closed:
            pass
        except TimeoutError:
            self.counters["timeouts"] += 1
        except ProtocolError as exc:
            self.counters["protocol_errors"] += 1
            log.debug("closing %s: %s", conn.peer, exc)
            self._fail(conn, header, P.Status.BAD_REQUEST, str(exc))
        except Exception as exc:  # a server bug must only cost this connection
            self.counters["server_errors"] += 1
            log.exception("internal error on connection %s", conn.peer)
            self._fail(conn, header, P.Status.SERVER_ERROR, f"internal error: {type(exc).__name__}")
        finally:
            conn.busy = False
            conn.close()
            self.connections.discard(conn)

    def _fail(self, conn: Connection, header: P.Header | None, status: P.Status, message: str) -> None:
        body = P.error_body(message)
        op = header.opcode if header is not None else P.Op.PING
        rid = header.request_id if header is not None else 0
        conn.write(P.pack_header(op, rid, status=status, body_len=len(body)), body)

    async def _request(self, conn: Connection, h: P.Header) -> Reply:
        P.check_request_shape(h)
        op = P.Op(h.opcode)
        self.counters[f"op_{op.name.lower()}"] += 1
        limit = self.config.max_message_bytes if conn.authed else P.PRE_AUTH_MAX_BODY
        if h.body_len > limit:
            self.counters["refused_oversize"] += 1
            return self._error(P.Status.TOO_LARGE, f"body of {h.body_len} bytes exceeds the limit of {limit}")
        if not conn.authed and op not in (P.Op.HELLO, P.Op.PING):
            self.counters["refused_unauthenticated"] += 1
            return self._error(P.Status.AUTH_REQUIRED, "this server requires a token: send HELLO first")
        budget = self.budget
        async with asyncio.timeout(self.config.read_timeout_s):
            await budget.acquire(h.body_len)
        try:
            async with asyncio.timeout(self.config.read_timeout_s):
                if op == P.Op.PUT:
                    key = await conn.read_exact(P.KEY_BYTES)
                    frame = bytearray(h.body_len - P.KEY_BYTES)
                    await conn.read_into(memoryview(frame))
                    return await self._put(key, frame)
                if h.body_len <= SMALL_BODY:
                    body: bytes | bytearray = await conn.read_exact(h.body_len) if h.body_len else b""
                else:
                    body = bytearray(h.body_len)
                    await conn.read_into(memoryview(body))
            return await self._dispatch(conn, op, h, body)
        finally:
            budget.release(h.body_len)

    @staticmethod
    def _error(status: P.Status, message: str) -> Reply:
        return status, [P.error_body(message)], 0, 0, 0

    async def _put(self, key: bytes, frame: bytearray) -> Reply:
        try:
            wire.check_frame(frame, key)
        except CorruptChunk as exc:
            self.counters["refused_corrupt"] += 1
            return self._error(P.Status.CORRUPT, f"frame for key {key.hex()} refused: {exc}")
        try:
            stored = await self.store.put(key, frame)
        except KvtierError as exc:
            self.counters["store_errors"] += 1
            return self._error(P.Status.REFUSED, f"cannot store chunk: {exc}")
        if not stored:
            return self._error(P.Status.REFUSED, f"frame of {len(frame)} bytes exceeds the store capacity "
                                                 f"of {self.store.memory.capacity_bytes}")
        return P.Status.OK, [], 0, 0, 0

    async def _dispatch(self, conn: Connection, op: P.Op, h: P.Header, body: bytes | bytearray) -> Reply:
        ok = P.Status.OK
        if op == P.Op.PING:
            return ok, [], 0, 0, 0
        if op == P.Op.HELLO:
            return self._hello(conn, body)
        if op == P.Op.GET:
            frame = await self.store.get(bytes(body))
            if frame is None:
                return P.Status.NOT_FOUND, [], 0, 0, 0
            async with asyncio.timeout(self.config.read_timeout_s):
                await self.budget.acquire(len(frame))  # released once the kernel took the response
            return ok, [frame], 0, 0, len(frame)
        if op == P.Op.EXISTS:
            found = self.store.exists(P.split_keys(body, h.key_count))
            return ok, [bytes(found)], 0, 0, 0
        if op == P.Op.DELETE:
            gone = await self.store.delete(P.split_keys(body, h.key_count))
            return ok, [bytes(gone)], 0, 0, 0
        if op == P.Op.LIST:
            return self._list(body)
        if op == P.Op.STATS:
            return ok, [_enc.encode(self.stats())], 0, 0, 0
        if op == P.Op.CLEAR:
            removed = await self.store.clear()
            return ok, [_enc.encode({"removed": removed})], 0, 0, 0
        raise ProtocolError(f"unhandled opcode {op}")  # pragma: no cover - Op is exhaustive above

    def _hello(self, conn: Connection, body: bytes | bytearray) -> Reply:
        try:
            hello = _hello.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad HELLO body: {exc}") from exc
        if self.token and not hmac.compare_digest(hello.token.encode(), self.token.encode()):
            self.counters["auth_failures"] += 1
            log.warning("connection %s presented a wrong token", conn.peer)
            return self._error(P.Status.AUTH_FAILED, "wrong token")
        conn.authed = True
        info = P.ServerInfo(
            version=P.VERSION,
            auth_required=bool(self.token),
            max_message_bytes=self.config.max_message_bytes,
            capacity_bytes=self.store.memory.capacity_bytes,
            persistent=self.store.persistent,
        )
        return P.Status.OK, [_enc.encode(info)], 0, 0, 0

    def _list(self, body: bytes | bytearray) -> Reply:
        try:
            req = _list_req.decode(body) if body else P.ListRequest()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad LIST body: {exc}") from exc
        room = max(0, (self.config.max_message_bytes - P.HEADER_BYTES) // P.KEY_BYTES)
        limit = max(0, min(req.limit, room))
        keys = [k for k in self.store.sorted_keys() if k > req.after]
        more = len(keys) > limit
        keys = keys[:limit]
        return P.Status.OK, [b"".join(keys)], len(keys), P.FLAG_MORE if more else 0, 0

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.counters)
        out.update(
            connections=len(self.connections),
            inflight_bytes=self.budget.used,
            inflight_peak_bytes=self.budget.peak,
            max_inflight_bytes=self.budget.cap,
            uptime_s=round(time.monotonic() - self.started, 3),
        )
        try:
            import psutil

            out["rss_bytes"] = psutil.Process().memory_info().rss
        except Exception:  # psutil missing or /proc unreadable: stats stay useful without it
            pass
        out.update({f"store_{k}": v for k, v in self.store.stats().items()})
        return out

    # ---- shutdown --------------------------------------------------------------------------------
    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, finish requests in progress (bounded), close the store."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("shutdown: %d requests did not finish within %.1fs", len(late), grace)
                await asyncio.wait(late, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
        if self.io_pool is not None:
            self.io_pool.shutdown(wait=True)
        self.store.close()
        log.info("kvtier server stopped")


def _raise_fd_limit(want: int) -> None:
    """Raise the soft open-files limit towards ``want`` (up to the hard limit); warn if it stays lower."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < want:
        log.warning("open-files limit %d is below the %d that server.max_connections needs", soft, want)


def build_store(config: ServerConfig) -> ChunkStore:
    """The in-memory store, backed by a :class:`~kvtier.storage.disk.DiskTier` if ``persist_path``."""
    disk = None
    if config.persist_path:
        from kvtier.storage.disk import DiskTier  # imports torch via kvtier.keys: only when persisting

        disk = DiskTier(config.persist_path, config.persist_capacity, config.policy,
                        fsync=config.persist_fsync)
    return ChunkStore(config.capacity, config.policy, disk)


async def serve(config: ServerConfig, on_ready: Callable[[CacheServer], None] | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully."""
    server = CacheServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as exc:
        server.store.close()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    log.info("signal received: shutting down")
    await server.shutdown()


def run(config: ServerConfig, on_ready: Callable[[CacheServer], None] | None = None) -> None:
    """Blocking entry point used by the CLI."""
    asyncio.run(serve(config, on_ready))
