"""An MPUT body received in one pass by one I/O thread: item heads, frames and their checks.

Receiving item by item through the event loop costs three or more thread and loop wake-ups per frame
(item head through the loop's buffer, frame through an I/O thread, check back on the loop); on a busy
2-core machine each wake-up can wait a scheduler slice: ~3 ms of them around ~2 ms of receiving per
5.9 MB frame (timestamps around the server's receive steps during engine stores of 8K tokens, load
average ~6). Here the thread reads ``key | u64 length | frame`` items back to back with blocking socket
calls, each frame straight into its buffer, and checks each frame as soon as it is whole, so a message
costs one handoff each way.

The check is the frame's structure (:func:`kvtier.wire.check_frame`: header, lengths, the key it
names), not its checksum: integrity is end to end (every reader verifies every frame), and a checksum
the server recomputed would prove nothing against a client, which can compute one too. Dropping the
xxh3 pass (it ran slice by slice while cache-hot) took the server's CPU per 189 MB engine store from
50-85 ms to 45-59 ms (median of 10-15 stores per side, old and new server processes interleaved store
by store, shared 2-core machine); ``kvtier bench tiers --tier server`` gives the store ratio against
raw loopback TCP.

Invariants:
- Every item is validated before its frame is received: a frame above ``limit`` or beyond the bytes
  the message header announced raises :class:`ProtocolError` (the server closes the connection).
- Exactly the message's bytes are consumed: first what the event loop had already buffered
  (``prefix``, which must lie inside the message), then the socket; the next request stays unread.
- A frame is handed out only whole and with the outcome of its structure check (``""`` or why not);
  frames land in buffers from ``take`` (the server's :class:`~kvtier.server.pool.BufferPool`).
- :meth:`MputBody.run` stops (False) when the socket's receive timeout expires with nothing received
  and resumes where it stopped on the next call; its socket must be blocking with that timeout set.
  It raises the socket's receive mark (``SO_RCVLOWAT``) only while it runs and never past what the
  message still brings; the mark is 1 again whenever it returns or raises.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np

from kvtier import wire
from kvtier.errors import CorruptChunk, ProtocolError
from kvtier.storage import remote_protocol as P

# one received item: key, frame, why its check failed ("" when it passed)
Item = tuple[bytes, np.ndarray, str]
LOWAT = 256 << 10  # the kernel wakes the receiving thread once this many bytes are queued (or the message's rest)


class MputBody:
    """Progress of one MPUT body (``count`` items in ``body_len`` bytes)."""

    def __init__(self, count: int, body_len: int, limit: int, take: Callable[[int], np.ndarray]) -> None:
        self.count = count
        self.left = body_len
        self.limit = limit
        self.prefix = memoryview(b"")  # bytes of the body the event loop had already buffered
        self.take = take
        self.head = bytearray(P.MPUT_ITEM.size)
        self.key = b""
        self.frame: np.ndarray | None = None  # the frame being received
        self.target = memoryview(self.head)  # what is being filled: an item head or the frame
        self.got = 0
        self.received = 0  # bytes taken from the socket (not the prefix)
        self.items: list[Item] = []
        self.lowat_cap = 1  # SO_RCVLOWAT allowed on this socket during run(), 1 = the kernel's default
        self.lowat = 1  # SO_RCVLOWAT set now

    def run(self, sock: socket.socket) -> bool:
        """Receive until every item is in :attr:`items` (True) or the peer stalled (False). The socket's
        ``SO_RCVLOWAT`` is raised meanwhile (see :meth:`_wake_after`) and back at 1 when this returns."""
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.lowat_cap = max(1, min(LOWAT, rcvbuf // 4))
        try:
            while len(self.items) < self.count:
                if not self._fill(sock):
                    return False
                if self.frame is None:
                    self._start_frame()
                else:
                    self._finish_frame()
            return True
        finally:
            self._wake_after(sock, 1)

    def _wake_after(self, sock: socket.socket, n: int) -> None:
        """Have the kernel wake this thread only once ``n`` bytes are queued: one wake-up (and one copy)
        per ``n`` bytes instead of one per arriving segment batch. The kernel checks the mark against
        what is queued, not against what a waiting ``recv`` still needs, so a receive must end at least
        ``n`` bytes before the message does (those bytes are surely coming); the message's last
        :data:`LOWAT` bytes are received with the mark at 1 (otherwise the receive waited for its
        timeout: measured). ``n`` stays under a quarter of the receive buffer: a mark the buffer does
        not hold twice over makes the kernel grow the buffer and clamp the TCP window to the mark.
        Server CPU per 189 MB engine store: 48-55 -> 39-44 ms median with 256 KiB (15 stores per side,
        old and new server processes interleaved, shared 2-core machine)."""
        if n != self.lowat:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n

    def _fill(self, sock: socket.socket) -> bool:
        view = self.target
        if self.prefix and self.got < len(view):
            n = min(len(self.prefix), len(view) - self.got)
            view[self.got : self.got + n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            self.got += n
        while self.got < len(view):
            # the message's unread rest: ``left`` still counts an item head being filled, not a frame
            rest = self.left - self.got if self.frame is None else self.left + len(view) - self.got
            want = len(view) - self.got
            if rest > self.lowat_cap:  # stop lowat bytes before the message's end: those surely follow
                self._wake_after(sock, self.lowat_cap)
                want = min(want, rest - self.lowat_cap)
            else:  # the tail: woken per arrival, as a raised mark would not be reached
                self._wake_after(sock, 1)
            try:
                n = sock.recv_into(view[self.got : self.got + want], 0, socket.MSG_WAITALL)
            except BlockingIOError:  # the receive timeout expired with nothing received
                return False
            if n == 0:
                raise ConnectionError("peer closed the connection mid-message")
            self.got += n
            self.received += n
        return True

    def _start_frame(self) -> None:
        key, size = P.MPUT_ITEM.unpack(self.head)
        i = len(self.items)
        self.left -= P.MPUT_ITEM.size
        last = i == self.count - 1
        if size > self.limit or size > self.left or (last and size != self.left):
            raise ProtocolError(f"MPUT item {i} announces {size} bytes with {self.left} left in the body "
                                f"(limit {self.limit})")
        self.left -= size
        self.key, self.frame = key, self.take(size)
        self.target, self.got = self.frame.data, 0

    def _finish_frame(self) -> None:
        assert self.frame is not None
        why = ""
        try:
            wire.check_frame(self.target, self.key)
        except CorruptChunk as exc:
            why = str(exc)
        self.items.append((self.key, self.frame, why))
        self.frame = None
        self.target, self.got = memoryview(self.head), 0
