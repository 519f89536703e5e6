"""The cache server's request/response framing (``KVS1``), shared by server and client.

Every message, in both directions, is a fixed 24-byte little-endian header followed by ``body_len``
bytes::

    offset size  field
    0      4     magic b"KVS1"
    4      1     version (1)
    5      1     opcode (:class:`Op`); a response repeats the opcode of its request
    6      1     status (:class:`Status`; 0 in requests)
    7      1     flags (:data:`FLAG_MORE` on a truncated LIST reply and on every MGET item but the last)
    8      4     request id, chosen by the client and echoed in the response
    12     4     key count
    16     8     body length

Bodies (keys are always :data:`KEY_BYTES` raw bytes, packed back to back):

============  ==========================================  ==============================================
opcode        request body                                 OK response body
============  ==========================================  ==============================================
HELLO         msgpack :class:`Hello`                       msgpack :class:`ServerInfo`
PING          empty                                        empty
PUT           1 key, then the wire frame (opaque)          empty
GET           1 key                                        the wire frame (NOT_FOUND: empty)
EXISTS        N keys                                       N bytes, 1 = present
DELETE        N keys                                       N bytes, 1 = was present
LIST          msgpack :class:`ListRequest` (may be empty)  key count N, N keys (sorted, after the cursor)
STATS         empty                                        msgpack ``dict[str, int | float]``
CLEAR         empty                                        msgpack ``{"removed": n}``
MGET          N keys                                       N replies (see below)
MPUT          N items ``key | u64 length | frame``         N bytes, the :class:`Status` of each item
============  ==========================================  ==============================================

MGET is answered by N messages, one per key in request order, each a full header (opcode MGET, the
request id, status OK or NOT_FOUND, key count = the item's index, :data:`FLAG_MORE` on all but the last)
followed by that key's frame (empty on NOT_FOUND): the client can consume frame i while frame i+1 is
on the wire, and receive each straight into its destination. A non-OK, non-NOT_FOUND status ends the
reply early (its body is the explanation). MPUT's items are validated one by one before their frames are
read (each frame at most the server's message limit) and answered once, after every item was stored
or refused; a refused item (CORRUPT, REFUSED) does not stop the others.

A non-OK response carries a UTF-8 explanation as its body. Invariants: a receiver validates the header
(magic, version, opcode, key count vs. body length, body length vs. its limit) *before* reading the
body; responses on one connection come in request order, so a client may pipeline many requests and
match replies by id. No pickle: structured bodies are msgspec records, chunk frames are opaque bytes.
A receiver caps every body by its *own* configured limit, never by a limit its peer announced.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Sequence

import msgspec

from kvtier.errors import ProtocolError

MAGIC = b"KVS1"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIIQ")
HEADER_BYTES = HEADER.size  # 24
KEY_BYTES = 16  # == kvtier.keys.KEY_BYTES (checked by a test; importing kvtier.keys would pull in torch)
FLAG_MORE = 0x01
MAX_ERROR_BYTES = 1024
PRE_AUTH_MAX_BODY = 4096  # largest body accepted before a connection has authenticated
MAX_KEYS = 65536  # keys in one EXISTS / DELETE request (bounds the work one message can ask for)


class Op(enum.IntEnum):
    HELLO = 1
    PING = 2
    PUT = 3
    GET = 4
    EXISTS = 5
    DELETE = 6
    LIST = 7
    STATS = 8
    CLEAR = 9
    MGET = 10
    MPUT = 11


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2  # malformed message: the server closes the connection after replying
    AUTH_REQUIRED = 3
    AUTH_FAILED = 4
    TOO_LARGE = 5  # body above the message limit; the body is not read and the connection is closed
    CORRUPT = 6  # PUT frame is malformed (header, lengths, key it names); nothing stored
    BUSY = 7  # connection limit reached
    SHUTTING_DOWN = 8
    SERVER_ERROR = 9
    REFUSED = 10  # PUT not stored (frame larger than the store or quota, or the persistence tier refused it)
    FORBIDDEN = 11  # this identity may not use the opcode here (LIST/CLEAR/STATS need admin; a P2P peer
    # serves GET/EXISTS only); the connection stays open


#: Statuses after which the server closes the connection.
CLOSING = frozenset({Status.BAD_REQUEST, Status.AUTH_REQUIRED, Status.AUTH_FAILED, Status.TOO_LARGE,
                     Status.BUSY, Status.SHUTTING_DOWN, Status.SERVER_ERROR})
_OPS = frozenset(int(op) for op in Op)


class Hello(msgspec.Struct, frozen=True):
    """First request of a connection; required when the server has a token."""

    token: str = ""
    client: str = ""


class ServerInfo(msgspec.Struct, frozen=True):
    version: int
    auth_required: bool
    max_message_bytes: int
    capacity_bytes: int
    persistent: bool


class ListRequest(msgspec.Struct, frozen=True):
    """Keys of ``tenant`` strictly greater than ``after`` (byte order), at most ``limit`` of them."""

    after: bytes = b""
    limit: int = 65536
    tenant: str = ""


MPUT_ITEM = struct.Struct("<16sQ")  # key, frame length: the head of each MPUT item


class Header(msgspec.Struct, frozen=True, array_like=True):
    """A decoded message header (see the module docstring)."""

    opcode: int
    status: int
    flags: int
    request_id: int
    key_count: int
    body_len: int


def pack_header(opcode: int, request_id: int, *, status: int = 0, flags: int = 0, key_count: int = 0,
                body_len: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, opcode, status, flags, request_id & 0xFFFFFFFF, key_count, body_len)


def unpack_header(data: bytes | bytearray | memoryview) -> Header:
    """Validate magic, version and opcode; raise :class:`ProtocolError` naming what was wrong."""
    if len(data) != HEADER_BYTES:
        raise ProtocolError(f"header is {len(data)} bytes, expected {HEADER_BYTES}")
    magic, version, opcode, status, flags, rid, count, body_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}, expected {VERSION}")
    if opcode not in _OPS:
        raise ProtocolError(f"unknown opcode {opcode}")
    return Header(opcode, status, flags, rid, count, body_len)


def check_request_shape(h: Header) -> None:
    """Check key count against body length for each opcode (before the body is read)."""
    op = h.opcode
    if op in (Op.PING, Op.STATS, Op.CLEAR):
        if h.key_count or h.body_len:
            raise ProtocolError(f"{Op(op).name} takes no keys and no body, got {h.key_count} keys, "
                                f"{h.body_len} bytes")
    elif op == Op.PUT:
        if h.key_count != 1 or h.body_len <= KEY_BYTES:
            raise ProtocolError(f"PUT takes 1 key and a frame, got {h.key_count} keys, {h.body_len} bytes")
    elif op == Op.MPUT:
        if not 0 < h.key_count <= MAX_KEYS or h.body_len <= h.key_count * MPUT_ITEM.size:
            raise ProtocolError(f"MPUT with {h.key_count} keys cannot have a body of {h.body_len} bytes")
    elif op in (Op.GET, Op.EXISTS, Op.DELETE, Op.MGET):
        if op == Op.GET and h.key_count != 1:
            raise ProtocolError(f"GET takes 1 key, got {h.key_count}")
        if not 0 < h.key_count <= MAX_KEYS or h.body_len != h.key_count * KEY_BYTES:
            raise ProtocolError(f"{Op(op).name} with {h.key_count} keys needs a body of "
                                f"{h.key_count * KEY_BYTES} bytes, got {h.body_len}")
    elif op in (Op.HELLO, Op.LIST) and h.key_count:
        raise ProtocolError(f"{Op(op).name} takes no keys, got {h.key_count}")


def split_keys(body: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    view = memoryview(body)
    if len(view) != count * KEY_BYTES:
        raise ProtocolError(f"{count} keys need {count * KEY_BYTES} bytes, got {len(view)}")
    return [bytes(view[i : i + KEY_BYTES]) for i in range(0, len(view), KEY_BYTES)]


IOV_MAX = 512  # buffers per sendmsg call (the kernel refuses more than 1024)


def byte_view(part: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``part`` (a tensor-backed memoryview may have another format or shape)."""
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def send_parts(sock: socket.socket, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Send every part, in order, with as few ``sendmsg`` calls as the kernel allows (no joining).
    ``BlockingIOError`` (a send timeout of a blocking socket) propagates."""
    send_views(sock, [v for v in (byte_view(p) for p in parts) if v.nbytes])


def send_views(sock: socket.socket, views: list[memoryview]) -> None:
    """Send ``views`` in order, consuming the list as bytes go out: after a timeout exception the list
    holds exactly what is left, so the caller can resume."""
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            else:
                views[0] = views[0][sent:]
                sent = 0


def error_body(message: str) -> bytes:
    return message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]

