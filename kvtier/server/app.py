"""``kvtier server``: an asyncio cache server for wire frames (protocol in :mod:`kvtier.storage.remote_protocol`).

Invariants:
- Binds 127.0.0.1 by default and refuses (``ConfigError``) any non-loopback address without a token.
  With tokens configured, a connection must authenticate (HELLO, compared with
  :func:`kvtier.net.token_matches`) before any command but PING; before that its bodies are capped at
  ``PRE_AUTH_MAX_BODY`` and it is closed ``auth_timeout_s`` after it opened, whatever it sends (a PING
  does not extend that deadline), so strangers cannot hold connection slots.
- Identities: the token a connection presented decides its tenant (``tenants`` maps tokens to tenant
  names; ``token`` is the default tenant) and whether it is admin (``admin_token``; without an admin
  token and without tenants the one trust domain is admin). A tenant reads and writes only its own
  namespace (:mod:`kvtier.server.store`); LIST, STATS and CLEAR are admin-only (FORBIDDEN otherwise).
  A server may also be restricted to a set of opcodes (a P2P peer serves GET/MGET/EXISTS only).
- A header is validated before its body is read; a body above ``max_message_bytes`` is refused.
  Malformed input gets one error reply and closes *that* connection; nothing a peer sends stops the
  server or another connection.
- Memory is bounded and grows with what arrives: a body is received straight into one buffer of its
  final size, either the buffer of a dropped frame kept for reuse (:mod:`kvtier.server.pool`) or a
  fresh uninitialised one (address space only: the kernel commits a page when received bytes are
  written to it, so a header whose body never comes costs no memory); the store holds at most
  ``capacity`` bytes; large request bodies being read or processed, plus the buffers kept for reuse,
  hold at most ``max_inflight_bytes`` (a body takes its share once its first byte arrived; a reader
  waits for budget, which back-pressures its client through TCP, and kept buffers are freed first),
  and large GET replies not
  yet taken by the kernel hold at most ``max_inflight_bytes`` of a separate budget. Bodies up to
  :data:`SMALL_BODY` take no budget, so a PING or a key lookup never waits behind large transfers. A
  whole request must arrive within ``read_timeout_s``; an authenticated connection may idle
  ``idle_timeout_s`` between requests. Each connection has one fixed 64 KiB scratch buffer; at most
  ``max_connections`` connections exist (more get BUSY and are closed).
- A PUT frame's structure is checked (wire header, lengths, the key it names) before it is stored;
  a malformed put is refused with CORRUPT and nothing changes. The server does not recompute the
  payload checksum: it stores what it is given within its caps, and integrity is end to end (every
  reader verifies each frame's checksum or MAC, key and identity; a checksum the server recomputed
  proves nothing against a client, which can compute one too). A damaged frame a client put is served
  as stored and becomes the reader's counted corrupt miss. A PUT is acknowledged OK only once the store holds it
  as promised (memory, or the disk when persistence is on); otherwise the reply is REFUSED.
- Responses on a connection are written in request order (pipelining).
- On SIGTERM/SIGINT: stop accepting, close idle connections, let requests in progress finish (up to
  ``shutdown_grace_s``), then close the store (persisted data is on disk) and return.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
import numpy as np

from kvtier import wire
from kvtier.compat import async_timeout
from kvtier.config import ServerConfig
from kvtier.errors import ConfigError, CorruptChunk, KvtierError, ProtocolError
from kvtier.net import is_loopback, token_matches
from kvtier.server.mput import MputBody
from kvtier.server.pool import BufferPool
from kvtier.server.store import ChunkStore, Frame
from kvtier.storage import remote_protocol as P

log = logging.getLogger(__name__)

SCRATCH_BYTES = 64 * 1024
SMALL_BODY = 16 * 1024  # bodies up to this size are read through the scratch buffer
WRITE_SLICE = 256 * 1024  # largest piece of a response handed to the transport at once
DIRECT_IO = 256 * 1024  # bodies at least this large move through a worker thread's socket calls
STALL_S = 0.25  # an I/O thread gives a transfer back to the event loop after the peer stalls this long
MGET_GROUP = 32 << 20  # MGET replies handed to the socket at once, at most (plus one frame)
ADMIN_OPS = frozenset({P.Op.LIST, P.Op.STATS, P.Op.CLEAR})
TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
T = TypeVar("T")
_hello = msgspec.msgpack.Decoder(P.Hello)
_list_req = msgspec.msgpack.Decoder(P.ListRequest)
_enc = msgspec.msgpack.Encoder()


class _Closed(Exception):
    """The peer closed the connection (or it was closed under us)."""


def check_bind(host: str, token: str) -> None:
    """Raise :class:`ConfigError` if binding ``host`` without ``token`` would expose the cache."""
    if not token and not is_loopback(host):
        raise ConfigError(
            f"server.host is {host!r}, which is not a loopback address; set server.token (or --token / "
            "KVTIER_SERVER__TOKEN) so clients must authenticate, or bind 127.0.0.1"
        )


Identity = tuple[str, str, bool]  # token, tenant, admin


def identities(config: ServerConfig) -> list[Identity]:
    """The tokens a server accepts and who each one is; ``ConfigError`` (never showing a token) for an
    unusable tenant table. Empty when the server requires no token."""
    single_domain = not config.admin_token and not config.tenants
    out: list[Identity] = []
    if config.admin_token:
        out.append((config.admin_token, "", True))
    if config.token:
        out.append((config.token, "", single_domain))
    for token, tenant in config.tenants.items():
        if not TENANT_NAME.fullmatch(tenant):
            raise ConfigError(f"server.tenants: tenant name {tenant!r} must be 1-64 letters, digits, '_' or '-'")
        if not token:
            raise ConfigError(f"server.tenants: tenant {tenant!r} has an empty token")
        out.append((token, tenant, False))
    unknown = set(config.tenant_quotas) - set(config.tenants.values())
    if unknown:
        raise ConfigError(f"server.tenant_quotas names tenants no token maps to: {sorted(unknown)}")
    if len({token for token, _t, _a in out}) != len(out):
        raise ConfigError("server.token, server.admin_token and server.tenants must all use different tokens")
    return out


def authenticate(known: list[Identity], presented: str) -> tuple[str, bool] | None:
    """``(tenant, admin)`` of the identity whose token is ``presented``, comparing with every token in
    constant time per token; ``None`` if none matches."""
    match = None
    for token, tenant, admin in known:
        if token_matches(presented, token):
            match = (tenant, admin)
    return match


class ByteBudget:
    """FIFO counting semaphore over bytes: ``acquire(n)`` waits until ``used + n <= cap``.

    ``reclaim()``, when given, frees bytes held only for reuse (the server's
    :class:`~kvtier.server.pool.BufferPool`, which releases them here): it runs whenever a caller of
    :meth:`acquire` would otherwise wait, so what is kept for reuse never delays a caller."""

    def __init__(self, cap: int, reclaim: Callable[[], object] | None = None) -> None:
        self.cap = cap
        self.used = 0
        self.peak = 0
        self._reclaim = reclaim
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if that needs no waiting (and nobody waits before us)."""
        if n <= self.cap and not self._waiters and self.used + n <= self.cap:
            self._take(n)
            return True
        return False

    async def acquire(self, n: int) -> None:
        if n > self.cap:
            raise ProtocolError(f"{n} bytes exceed the in-flight cap of {self.cap}")
        if self._reclaim is not None and (self._waiters or self.used + n > self.cap):
            self._reclaim()
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
        self.authed = not server.auth_required
        self.tenant = ""
        self.admin = not server.auth_required and server.single_domain
        self.peer = ""
        self.must_close = False  # close after the current reply (a forbidden request's body was not read)
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self._dup: socket.socket | None = None
        self._io: asyncio.Future[Any] | None = None

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
        self.target, self.target_got = dest[take:], 0
        try:
            self._resume()
            while self.target is not None:
                await self._wait()
        finally:
            self.target = None

    async def wait_data(self) -> None:
        """Return once at least one unread byte is buffered (a header alone does not count)."""
        while not self.buffered:
            self._resume()
            await self._wait()

    async def read_body(self, n: int) -> np.ndarray:
        """The next ``n`` bytes, received into a buffer of exactly ``n`` bytes (the frame the store then
        keeps: no byte is copied twice): one the server's :class:`~kvtier.server.pool.BufferPool` kept
        (pages already committed: no page faults), or a fresh uninitialised one, which takes address
        space, not memory: pages are committed as received bytes land in them, so what a peer announces
        but does not send costs nothing. Large remainders move through an I/O thread (see
        :meth:`_transfer`)."""
        body = self.server.pool.take(n)
        dest = body.data
        if n - self.buffered < DIRECT_IO or self._thread_socket() is None:
            await self.read_into(dest)
            return body
        take = self.buffered
        dest[:take] = self.view[self.start : self.end]
        self.start = self.end = 0
        self._pause()  # the transport must not read while the thread does
        state = [dest, take]
        await self._transfer(_recv_rest, state, writable=False)
        state.clear()  # whatever still holds the thread's state must not hold the body (see pool.py)
        self.server.counters["bytes_in"] += n - take
        self._resume()
        return body

    def can_stream(self, n: int) -> bool:
        """Whether the next ``n`` bytes are worth receiving through an I/O thread (and one exists)."""
        return n - self.buffered >= DIRECT_IO and self._thread_socket() is not None

    async def read_mput(self, body: MputBody) -> None:
        """Receive an MPUT body through an I/O thread in one pass (see :mod:`kvtier.server.mput`);
        only when :meth:`can_stream` said so for its length: what is buffered lies inside it."""
        body.prefix = memoryview(bytes(self.view[self.start : self.end]))
        self.start = self.end = 0
        self._pause()  # the transport must not read while the thread does
        await self._transfer(_recv_mput, body, writable=False)
        self.server.counters["bytes_in"] += body.received
        self._resume()

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
        return self._dup

    async def _transfer(self, fn: Callable[[socket.socket, Any], bool], state: Any, *, writable: bool) -> None:
        """Run ``fn(dup_socket, state)`` in the I/O pool until it returns True. ``fn`` gives its thread
        back (returning False, its progress kept in ``state``) whenever the peer stalls for
        :data:`STALL_S`; the event loop then waits, without a thread, until the socket is ready again.
        So stalled peers cannot occupy the pool; the caller's deadline bounds the whole transfer."""
        while True:
            if self.closed:
                raise _Closed
            if await self._in_thread(fn, state):
                return
            await self._ready(writable)

    async def _ready(self, writable: bool) -> None:
        """Wait until the duplicate socket is readable (or writable), or the connection closed."""
        assert self._dup is not None
        fd = self._dup.fileno()
        loop = asyncio.get_running_loop()
        if writable:
            loop.add_writer(fd, self._wake)
        else:
            loop.add_reader(fd, self._wake)
        try:
            await self._wait()
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _in_thread(self, fn: Callable[[socket.socket, Any], bool], arg: Any) -> bool:
        """Run ``fn(dup_socket, arg)`` in the I/O pool; socket errors close the connection."""
        dup = self._thread_socket()
        if dup is None or self.server.io_pool is None:
            raise _Closed
        fut = asyncio.get_running_loop().run_in_executor(self.server.io_pool, fn, dup, arg)
        self._io = fut
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)  # wake the thread; it fails at once
            fut.add_done_callback(_consume)  # its failure is expected: never "exception never retrieved"
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
            async with async_timeout(timeout_s):
                await self.drain()
            if self.closed:
                raise _Closed
            async with async_timeout(timeout_s):
                await self._transfer(_send_some, [P.byte_view(p) for p in parts if len(p)], writable=True)
            self.server.counters["bytes_out"] += total
            return
        for part in parts:
            view = memoryview(part)
            for i in range(0, len(view), WRITE_SLICE):
                self.write(view[i : i + WRITE_SLICE])
                if self._write_paused:
                    async with async_timeout(timeout_s):
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


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a finished future's outcome as seen (for transfers abandoned on purpose)."""
    if not fut.cancelled():
        fut.exception()


@contextlib.contextmanager
def _blocking(sock: socket.socket) -> Iterator[None]:
    """Make the duplicate socket blocking, with kernel send/receive timeouts of :data:`STALL_S`, for
    one thread transfer (the kernel then moves a whole step per call, without a poll per piece), and
    non-blocking again afterwards: the flag is shared with the event loop's socket, which does not
    touch it meanwhile (reading is paused, its write buffer drained)."""
    seconds = int(STALL_S)
    tv = struct.pack("ll", seconds, int((STALL_S - seconds) * 1e6))
    sock.setblocking(True)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        yield
    finally:
        sock.setblocking(False)


def _recv_rest(sock: socket.socket, state: list[Any]) -> bool:
    """Receive into ``state = [dest, filled]`` until ``dest`` is full; False (progress kept) once the
    peer sent nothing for :data:`STALL_S`. Raises ``ConnectionError`` if the peer closes mid-message."""
    dest: memoryview = state[0]
    with _blocking(sock):
        while state[1] < len(dest):
            try:
                got = sock.recv_into(dest[state[1] :], 0, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO expired with nothing received
                return False
            if got == 0:
                raise ConnectionError("peer closed the connection mid-message")
            state[1] += got
    return True


def _recv_mput(sock: socket.socket, body: MputBody) -> bool:
    """Receive ``body``'s items; False (progress kept) once the peer sent nothing for :data:`STALL_S`."""
    with _blocking(sock):
        return body.run(sock)


def _send_some(sock: socket.socket, views: list[memoryview]) -> bool:
    """Send ``views`` (consumed as they go); False (the rest kept) once the peer took nothing for
    :data:`STALL_S`."""
    with _blocking(sock):
        try:
            P.send_views(sock, views)
        except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent
            return False
    return True


# status, body parts, key count, flags, budget bytes to release once the response is drained
Reply = tuple[P.Status, list[Any], int, int, int]


class CacheServer:
    """The server object; :meth:`start` binds, :meth:`shutdown` drains. One event loop, one thread.

    ``ops`` restricts the opcodes served (others get FORBIDDEN); ``None`` serves all of them."""

    def __init__(self, config: ServerConfig, store: ChunkStore | None = None,
                 ops: frozenset[P.Op] | None = None) -> None:
        check_bind(config.host, config.token or config.admin_token or ",".join(config.tenants))
        if config.max_message_bytes > config.max_inflight_bytes:
            raise ConfigError(
                f"server.max_message_bytes ({config.max_message_bytes}) must not exceed "
                f"server.max_inflight_bytes ({config.max_inflight_bytes})"
            )
        self.config = config
        self.identities = identities(config)
        self.auth_required = bool(self.identities)
        self.single_domain = not config.admin_token and not config.tenants
        self.ops = ops
        self.store = store if store is not None else build_store(config)
        self.counters: Counter[str] = Counter()
        self.connections: set[Connection] = set()
        self.closing = False
        self.started = time.monotonic()
        self.port = 0
        self._budgets: tuple[ByteBudget, ByteBudget] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._loop_thread = 0
        # buffers of dropped frames, reused for request bodies; they hold request budget
        self.pool = BufferPool(lambda n: self.budget.try_acquire(n), self._give_back)
        self.store.memory.on_drop = self.pool.offer
        self.io_pool = (ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvtier-server-io")
                        if config.io_threads else None)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _give_back(self, n: int) -> None:
        """Release ``n`` bytes of request budget from any thread (the budget lives on the event loop)."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self.budget.release(n)
        else:
            self._loop.call_soon_threadsafe(self.budget.release, n)

    @property
    def budget(self) -> ByteBudget:
        """Bytes of large request bodies being received or processed."""
        return self._budget_pair()[0]

    @property
    def reply_budget(self) -> ByteBudget:
        """Bytes of large replies handed to the kernel but not yet taken."""
        return self._budget_pair()[1]

    def _budget_pair(self) -> tuple[ByteBudget, ByteBudget]:
        if self._budgets is None:  # created on the event loop that uses them
            cap = self.config.max_inflight_bytes
            self._budgets = (ByteBudget(cap, self.pool.drop_all), ByteBudget(cap))
        return self._budgets

    async def start(self) -> int:
        """Bind and listen; return the port (useful with port 0)."""
        _raise_fd_limit(3 * self.config.max_connections + 64)  # socket + duplicate per connection, files
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
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
        loop = asyncio.get_running_loop()
        auth_deadline = loop.time() + cfg.auth_timeout_s  # fixed at connect: no message moves it
        header: P.Header | None = None
        try:
            while not self.closing:
                header = None
                idle = conn.buffered == 0 and conn.authed
                wait = cfg.idle_timeout_s if idle else cfg.read_timeout_s
                async with async_timeout(wait if conn.authed else min(wait, auth_deadline - loop.time())):
                    raw = await conn.read_exact(P.HEADER_BYTES)
                conn.busy = True
                header = P.unpack_header(raw)
                async with async_timeout(None if conn.authed else auth_deadline - loop.time()):
                    reply = await self._request(conn, header)
                    if reply is not None:
                        await self._respond(conn, header, reply)
                if reply is not None and (reply[0] in P.CLOSING or conn.must_close):
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

    async def _respond(self, conn: Connection, h: P.Header, reply: Reply) -> None:
        status, parts, count, flags, hold = reply
        try:
            body_len = sum(len(p) for p in parts)
            head = P.pack_header(h.opcode, h.request_id, status=status, flags=flags, key_count=count,
                                 body_len=body_len)
            await conn.send([head, *parts], self.config.read_timeout_s)
        finally:
            if hold:
                self.reply_budget.release(hold)

    def _fail(self, conn: Connection, header: P.Header | None, status: P.Status, message: str) -> None:
        body = P.error_body(message)
        op = header.opcode if header is not None else P.Op.PING
        rid = header.request_id if header is not None else 0
        conn.write(P.pack_header(op, rid, status=status, body_len=len(body)), body)

    async def _request(self, conn: Connection, h: P.Header) -> Reply | None:
        """Read the body of request ``h`` and handle it; ``None`` if the handler already replied."""
        P.check_request_shape(h)
        op = P.Op(h.opcode)
        self.counters[f"op_{op.name.lower()}"] += 1
        limit = self.config.max_message_bytes if conn.authed else P.PRE_AUTH_MAX_BODY
        if op == P.Op.MPUT and conn.authed:  # read item by item; each frame is checked against the limit
            limit = h.key_count * (P.MPUT_ITEM.size + self.config.max_message_bytes)
        if h.body_len > limit:
            self.counters["refused_oversize"] += 1
            return self._error(P.Status.TOO_LARGE, f"body of {h.body_len} bytes exceeds the limit of {limit}")
        if not conn.authed and op not in (P.Op.HELLO, P.Op.PING):
            self.counters["refused_unauthenticated"] += 1
            return self._error(P.Status.AUTH_REQUIRED, "this server requires a token: send HELLO first")
        denied = self._denied(conn, op)
        if denied:
            self.counters["refused_forbidden"] += 1
            if h.body_len > SMALL_BODY:  # not worth reading just to skip it
                conn.must_close = True
            elif h.body_len:
                await self._timed(conn.read_exact(h.body_len))
            return self._error(P.Status.FORBIDDEN, denied)
        if op == P.Op.MPUT:
            return await self._mput(conn, h)
        if op == P.Op.PUT:
            key = await self._timed(conn.read_exact(P.KEY_BYTES))
            return await self._put_body(conn, key, h.body_len - P.KEY_BYTES)
        body: bytes | memoryview = b""
        if h.body_len:
            body = await self._timed(conn.read_exact(h.body_len) if h.body_len <= SMALL_BODY
                                     else self._large_body(conn, h.body_len))
        if op == P.Op.MGET:
            await self._mget(conn, h, P.split_keys(body, h.key_count))
            return None
        return await self._dispatch(conn, op, h, body)

    async def _timed(self, aw: Awaitable[T]) -> T:
        async with async_timeout(self.config.read_timeout_s):
            return await aw

    async def _large_body(self, conn: Connection, n: int) -> memoryview:
        """Receive a body above :data:`SMALL_BODY` under the request budget (released once received:
        these bodies are key lists and HELLO/LIST records, handled at once)."""
        await self.budget.acquire(n)
        try:
            return (await conn.read_body(n)).data
        finally:
            self.budget.release(n)

    def _denied(self, conn: Connection, op: P.Op) -> str:
        """Why ``conn`` may not use ``op`` here ('' if it may)."""
        if self.ops is not None and op not in self.ops and op not in (P.Op.HELLO, P.Op.PING):
            return f"{op.name} is not served here (this server answers {sorted(o.name for o in self.ops)})"
        if op in ADMIN_OPS and not conn.admin:
            return f"{op.name} needs the admin token"
        return ""

    @staticmethod
    def _error(status: P.Status, message: str) -> Reply:
        return status, [P.error_body(message)], 0, 0, 0

    async def _put_body(self, conn: Connection, key: bytes, size: int) -> Reply:
        """Receive a ``size``-byte frame for ``key`` (under the request budget), check and store it."""
        small = size <= SMALL_BODY
        if not small:  # a header whose body never comes holds no budget (and no I/O thread)
            await self._timed(conn.wait_data())
            await self._timed(self.budget.acquire(size))
        try:
            frame = await self._timed(conn.read_body(size))
            return await self._put(conn, key, frame)
        finally:
            if not small:
                self.budget.release(size)

    async def _put(self, conn: Connection, key: bytes, frame: np.ndarray) -> Reply:
        try:
            wire.check_frame(frame.data, key)
        except CorruptChunk as exc:
            return self._corrupt(key, str(exc))
        return await self._store(conn, key, frame)

    def _corrupt(self, key: bytes, why: str) -> Reply:
        self.counters["refused_corrupt"] += 1
        return self._error(P.Status.CORRUPT, f"frame for key {key.hex()} refused: {why}")

    async def _store(self, conn: Connection, key: bytes, frame: np.ndarray) -> Reply:
        """Store a frame whose structure passed :func:`kvtier.wire.check_frame`."""
        try:
            refused = await self.store.put(conn.tenant, key, frame)
        except KvtierError as exc:
            self.counters["store_errors"] += 1
            return self._error(P.Status.REFUSED, f"cannot store chunk {key.hex()}: {exc}")
        if refused:
            self.counters["refused_store"] += 1
            return self._error(P.Status.REFUSED, f"chunk {key.hex()} not stored: {refused}")
        return P.Status.OK, [], 0, 0, 0

    async def _mput(self, conn: Connection, h: P.Header) -> Reply:
        """Items ``key | u64 length | frame``, one status byte each. A body whose frames fit one message
        limit is received and checked by an I/O thread in one pass, under one budget of its frame bytes
        (:mod:`kvtier.server.mput`); others item by item."""
        frame_bytes = h.body_len - h.key_count * P.MPUT_ITEM.size
        if frame_bytes > self.config.max_message_bytes or not conn.can_stream(h.body_len):
            return await self._mput_items(conn, h)
        await self._timed(conn.wait_data())  # a header whose body never comes holds no budget
        await self._timed(self.budget.acquire(frame_bytes))
        try:
            body = MputBody(h.key_count, h.body_len, self.config.max_message_bytes, self.pool.take)
            await self._timed(conn.read_mput(body))
            self.counters["mput_one_pass"] += 1
            items, body.items = body.items, []  # the store holds the frames now, not the body
            statuses = bytearray()
            while items:
                key, frame, why = items.pop(0)
                reply = self._corrupt(key, why) if why else await self._store(conn, key, frame)
                statuses.append(reply[0])
            return P.Status.OK, [bytes(statuses)], h.key_count, 0, 0
        finally:
            self.budget.release(frame_bytes)

    async def _mput_items(self, conn: Connection, h: P.Header) -> Reply:
        """Items read and stored one at a time through the event loop."""
        left = h.body_len
        statuses = bytearray()
        for i in range(h.key_count):
            key, size = P.MPUT_ITEM.unpack(await self._timed(conn.read_exact(P.MPUT_ITEM.size)))
            left -= P.MPUT_ITEM.size
            last = i == h.key_count - 1
            if size > self.config.max_message_bytes or size > left or (last and size != left):
                raise ProtocolError(f"MPUT item {i} announces {size} bytes with {left} left in the body "
                                    f"(limit {self.config.max_message_bytes})")
            left -= size
            status = (await self._put_body(conn, key, size))[0]
            statuses.append(status)
        return P.Status.OK, [bytes(statuses)], h.key_count, 0, 0

    async def _get_frame(self, conn: Connection, key: bytes) -> tuple[Frame | None, int]:
        """The frame of ``key`` in the connection's namespace and the reply budget it holds."""
        frame = await self.store.get(conn.tenant, key)
        if frame is None or len(frame) <= SMALL_BODY:
            return frame, 0
        await self._timed(self.reply_budget.acquire(len(frame)))  # released once the kernel took it
        return frame, len(frame)

    async def _mget(self, conn: Connection, h: P.Header, keys: list[bytes]) -> None:
        """Stream one reply per key (see the protocol docstring). Items are handed to the socket in
        groups of up to :data:`MGET_GROUP` bytes (one worker-thread handoff per group, not per frame);
        a group is sent early whenever the next frame's reply budget is not free at once, so a
        connection never waits for budget while holding some."""
        group: list[Any] = []
        held = 0
        for i, key in enumerate(keys):
            frame = await self.store.get(conn.tenant, key)
            size = 0 if frame is None else len(frame)
            hold = size if size > SMALL_BODY else 0
            if hold and not self.reply_budget.try_acquire(hold):
                held = await self._flush(conn, group, held)
                await self._timed(self.reply_budget.acquire(hold))
            held += hold
            status = P.Status.NOT_FOUND if frame is None else P.Status.OK
            group.append(P.pack_header(h.opcode, h.request_id, status=status, key_count=i, body_len=size,
                                       flags=P.FLAG_MORE if i + 1 < len(keys) else 0))
            if frame is not None:
                group.append(frame)
            if held >= MGET_GROUP:
                held = await self._flush(conn, group, held)
        await self._flush(conn, group, held)

    async def _flush(self, conn: Connection, parts: list[Any], held: int) -> int:
        """Send ``parts`` (then empty the list) and release ``held`` reply budget; return 0."""
        try:
            if parts:
                await conn.send(parts, self.config.read_timeout_s)
        finally:
            parts.clear()
            if held:
                self.reply_budget.release(held)
        return 0

    async def _dispatch(self, conn: Connection, op: P.Op, h: P.Header, body: bytes | memoryview) -> Reply:
        ok = P.Status.OK
        if op == P.Op.PING:
            return ok, [], 0, 0, 0
        if op == P.Op.HELLO:
            return self._hello(conn, body)
        if op == P.Op.GET:
            frame, hold = await self._get_frame(conn, bytes(body))
            if frame is None:
                return P.Status.NOT_FOUND, [], 0, 0, 0
            return ok, [frame], 0, 0, hold
        if op == P.Op.EXISTS:
            found = self.store.exists(conn.tenant, P.split_keys(body, h.key_count))
            return ok, [bytes(found)], 0, 0, 0
        if op == P.Op.DELETE:
            gone = await self.store.delete(conn.tenant, P.split_keys(body, h.key_count))
            return ok, [bytes(gone)], 0, 0, 0
        if op == P.Op.LIST:
            return self._list(body)
        if op == P.Op.STATS:
            return ok, [_enc.encode(self.stats())], 0, 0, 0
        if op == P.Op.CLEAR:
            removed = await self.store.clear()
            return ok, [_enc.encode({"removed": removed})], 0, 0, 0
        raise ProtocolError(f"unhandled opcode {op}")  # pragma: no cover - Op is exhaustive above

    def _hello(self, conn: Connection, body: bytes | memoryview) -> Reply:
        try:
            hello = _hello.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad HELLO body: {exc}") from exc
        if self.auth_required:
            match = authenticate(self.identities, hello.token)
            if match is None:
                self.counters["auth_failures"] += 1
                log.warning("connection %s presented a wrong token", conn.peer)
                return self._error(P.Status.AUTH_FAILED, "wrong token")
            conn.tenant, conn.admin = match
            conn.authed = True
        info = P.ServerInfo(
            version=P.VERSION,
            auth_required=self.auth_required,
            max_message_bytes=self.config.max_message_bytes,
            capacity_bytes=self.store.memory.capacity_bytes,
            persistent=self.store.persistent,
        )
        return P.Status.OK, [_enc.encode(info)], 0, 0, 0

    def _list(self, body: bytes | memoryview) -> Reply:
        try:
            req = _list_req.decode(body) if body else P.ListRequest()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad LIST body: {exc}") from exc
        room = max(0, (self.config.max_message_bytes - P.HEADER_BYTES) // P.KEY_BYTES)
        limit = max(0, min(req.limit, room))
        keys = [k for k in self.store.sorted_keys(req.tenant) if k > req.after]
        more = len(keys) > limit
        keys = keys[:limit]
        return P.Status.OK, [b"".join(keys)], len(keys), P.FLAG_MORE if more else 0, 0

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.counters)
        out.update(
            connections=len(self.connections),
            inflight_bytes=self.budget.used - self.pool.bytes,
            inflight_peak_bytes=self.budget.peak,
            reply_inflight_bytes=self.reply_budget.used,
            reply_inflight_peak_bytes=self.reply_budget.peak,
            max_inflight_bytes=self.budget.cap,
            uptime_s=round(time.monotonic() - self.started, 3),
        )
        from kvtier.procs import rss_bytes

        rss = rss_bytes()
        if rss is not None:
            out["rss_bytes"] = rss
        out.update({f"store_{k}": v for k, v in self.store.stats().items()})
        out.update(self.pool.stats())
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
    """The in-memory store, backed by :class:`~kvtier.storage.disk.DiskTier`\\ s if ``persist_path``: the
    default tenant's at ``persist_path``, each configured tenant's at ``persist_path/tenants/<name>``
    (capped by ``persist_capacity`` and the tenant's quota)."""
    quotas = {name: int(q) for name, q in config.tenant_quotas.items() if q}
    disks = {}
    if config.persist_path:
        from pathlib import Path

        from kvtier.storage.disk import DiskTier  # imports torch via kvtier.keys: only when persisting

        root = Path(config.persist_path).expanduser()
        paths = {"": root, **{name: root / "tenants" / name for name in set(config.tenants.values())}}
        try:
            for name, path in paths.items():
                cap = min(config.persist_capacity, quotas.get(name) or config.persist_capacity)
                disks[name] = DiskTier(path, cap, config.policy, fsync=config.persist_fsync)
        except BaseException:
            for disk in disks.values():
                disk.close()
            raise
    return ChunkStore(config.capacity, config.policy, disks, quotas)


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
