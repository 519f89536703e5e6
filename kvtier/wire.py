"""The one serialized form of a chunk, on disk and on the network (torch-free; the tensor side is
:mod:`kvtier.frames`).

Layout (little endian)::

    offset size  field
    0      4     magic b"KVT1"
    4      2     version (2)
    6      2     flags (bit 0: authenticated; other bits reserved, 0)
    8      4     meta_len: bytes of the msgpack metadata record
    12     8     payload_len
    20     8     xxh3-64 of metadata bytes followed by payload bytes
    28     4     key_id: which key of the writer's keyring made the MAC (0: none)
    32     32    MAC: BLAKE3-keyed over bytes [0, 32) + metadata + payload (zeros when key_id is 0)
    64     ...   metadata (msgspec msgpack of :class:`ChunkMeta`), then payload

The checksum detects damage, for every reader (one without the tenant's secret too); the MAC
(:mod:`kvtier.frame_auth`) proves the writer held the secret. Integrity is end to end: stores in between
(the cache server, Redis, a shared filesystem) keep what they are given and check at most its structure
(:func:`check_frame`); every reader verifies every frame it uses. A reader with a keyring accepts only
frames whose MAC verifies under a key it holds (:class:`FrameAuthError` otherwise, or
:class:`CorruptChunk` when the checksum shows damage) and does not checksum them again: the MAC covers
the checksum field and every byte the checksum covers. A reader without keys checks the checksum only
and so trusts every writer of its tiers.

Invariant: :func:`unpack_meta` returns only frames whose lengths, checksum (MAC when the reader has
keys), metadata schema and record are valid; anything else raises :class:`CorruptChunk`. No pickle:
the metadata is a typed msgspec record and the payload is codec bytes.

Version history: 1 carried token ids only (SGLang page hashes posed as token ids) and no MAC; 2 has
``kind`` + ``identity`` (:mod:`kvtier.record`) and the MAC fields. A version-1 frame is a counted
corrupt miss (and a disk tier quarantines the file); nothing converts it.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec
import xxhash

from kvtier.errors import CorruptChunk, FrameAuthError, LayoutError
from kvtier.frame_auth import MAC_BYTES, FrameKeys
from kvtier.keys import ChunkKey
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord, Kind

MAGIC = b"KVT1"
VERSION = 2
FLAG_MAC = 1
HEADER = struct.Struct("<4sHHIQQI32s")
HEADER_BYTES = HEADER.size
MAC_COVERS = HEADER_BYTES - MAC_BYTES  # the header bytes before the MAC field
MAX_META_BYTES = 1 << 22
MAX_PAGE_IDENTITY = 4096
_NO_MAC = bytes(MAC_BYTES)


class ChunkMeta(msgspec.Struct, frozen=True):
    """Typed metadata of one chunk: its :class:`~kvtier.record.ChunkRecord` plus how it is encoded."""

    key: bytes
    parent: bytes
    kind: int  # kvtier.record.Kind
    identity: bytes  # uint32-le token ids (TOKENS) or the engine's page hash (PAGE)
    spec: str  # KVSpec.fingerprint()
    codec: str
    codec_params: dict[str, Any]
    num_tokens: int

    def record(self) -> ChunkRecord:
        return ChunkRecord(self.key, self.parent, self.identity, Kind(self.kind), self.num_tokens)


class Header(NamedTuple):
    meta_len: int
    payload_len: int
    checksum: int
    key_id: int
    mac: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChunkMeta)


# A frame's payload: one buffer, or several whose concatenation it is (e.g. the runs of an engine's
# memory a writer sends with ``writev`` or a reader fills with ``preadv``, without joining them).
Payload = bytes | memoryview | Sequence[bytes | memoryview]


def payload_parts(payload: Payload) -> tuple[bytes | memoryview, ...]:
    """``payload`` as the buffers it is made of, in order."""
    return (payload,) if isinstance(payload, (bytes, bytearray, memoryview)) else tuple(payload)


def advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views`` (byte views, in order) in place: what one ``writev`` /
    ``preadv`` / ``recvmsg_into`` over them moved."""
    done = 0
    while done < len(views) and n >= len(views[done]):
        n -= len(views[done])
        done += 1
    del views[:done]
    if n:
        views[0] = views[0][n:]


def _checksum(meta: bytes | memoryview, parts: Iterable[bytes | memoryview]) -> int:
    """xxh3-64 of ``meta`` followed by ``parts``: streaming, so any split of the same bytes gives the
    same value."""
    h = xxhash.xxh3_64()
    h.update(meta)
    for part in parts:
        h.update(part)
    return h.intdigest()


def frame_head(record: ChunkRecord, spec: KVSpec, codec: str, codec_params: dict[str, Any],
               payload: Payload, auth: FrameKeys | None = None) -> bytes:
    """Header + metadata of the frame of ``record`` around codec output ``payload``; the frame is
    ``head + payload`` (the parts of ``payload`` joined). With ``auth`` the header names its current key
    and carries the MAC."""
    meta = _encoder.encode(ChunkMeta(
        key=record.key, parent=record.parent, kind=int(record.kind), identity=record.identity,
        spec=spec.fingerprint(), codec=codec, codec_params=codec_params, num_tokens=record.num_tokens,
    ))
    parts = payload_parts(payload)
    payload_len = sum(memoryview(p).nbytes for p in parts)
    checksum = _checksum(meta, parts)
    if auth is None:
        return HEADER.pack(MAGIC, VERSION, 0, len(meta), payload_len, checksum, 0, _NO_MAC) + meta
    covered = HEADER.pack(MAGIC, VERSION, FLAG_MAC, len(meta), payload_len, checksum, auth.key_id, _NO_MAC)
    mac = auth.mac(auth.key_id, (memoryview(covered)[:MAC_COVERS], meta, *parts))
    assert mac is not None  # the current key is always in the ring
    return covered[:MAC_COVERS] + mac + meta


def read_header(frame: bytes | bytearray | memoryview) -> Header:
    """Validate the fixed header and return its fields."""
    if len(frame) < HEADER_BYTES:
        raise CorruptChunk(f"frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, flags, meta_len, payload_len, checksum, key_id, mac = HEADER.unpack_from(frame, 0)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CorruptChunk(f"unsupported wire version {version}, expected {VERSION}")
    if flags & ~FLAG_MAC or bool(flags & FLAG_MAC) != (key_id != 0):
        raise CorruptChunk(f"bad header flags {flags:#x} for key id {key_id}")
    if meta_len > MAX_META_BYTES:
        raise CorruptChunk(f"metadata length {meta_len} exceeds {MAX_META_BYTES}")
    return Header(meta_len, payload_len, checksum, key_id, mac)


def _mac_problem(head: memoryview, header: Header, parts: Iterable[bytes | memoryview],
                 auth: FrameKeys) -> str | None:
    """``None`` when the frame's MAC verifies under a key of ``auth``, else why it does not."""
    if header.key_id == 0:
        return "frame carries no MAC but this reader requires one (auth.secret is set)"
    mac = auth.mac(header.key_id, (head[:MAC_COVERS], *parts))
    if mac is None:
        return (f"frame was authenticated with key id {header.key_id:#010x}, which this keyring does not "
                "hold (another tenant, or a dropped previous secret)")
    if not hmac.compare_digest(mac, header.mac):
        return "MAC mismatch: the frame was not written by a holder of this tenant's secret"
    return None


def _decode_meta(meta_bytes: bytes | memoryview) -> ChunkMeta:
    try:
        meta = _decoder.decode(meta_bytes)
    except msgspec.DecodeError as exc:
        raise CorruptChunk(f"bad metadata record: {exc}") from exc
    if meta.kind == Kind.TOKENS:
        if len(meta.identity) != 4 * meta.num_tokens:
            raise CorruptChunk(f"metadata holds {len(meta.identity) // 4} token ids for {meta.num_tokens} tokens")
    elif meta.kind == Kind.PAGE:
        if not 0 < len(meta.identity) <= MAX_PAGE_IDENTITY:
            raise CorruptChunk(f"page identity of {len(meta.identity)} bytes, expected 1..{MAX_PAGE_IDENTITY}")
    else:
        raise CorruptChunk(f"unknown record kind {meta.kind}")
    return meta


def verify_parts(head: bytes | bytearray | memoryview, payload: Payload,
                 auth: FrameKeys | None = None) -> ChunkMeta:
    """Verify a frame given as ``head`` (header + metadata, exactly) and ``payload`` (one buffer or its
    parts in order): lengths, checksum, MAC when ``auth`` is given, metadata record. Return the
    metadata."""
    view = memoryview(head).cast("B")
    header = read_header(view)
    parts = payload_parts(payload)
    payload_bytes = sum(memoryview(p).nbytes for p in parts)
    if len(view) != HEADER_BYTES + header.meta_len or payload_bytes != header.payload_len:
        raise CorruptChunk(f"head of {len(view)} bytes and payload of {payload_bytes} bytes, header says "
                           f"{HEADER_BYTES + header.meta_len} and {header.payload_len}")
    meta_bytes = view[HEADER_BYTES:]
    # A MAC that verifies covers the checksum field and every byte the checksum covers: no second pass
    # over the payload. Without one, the checksum tells damage (CorruptChunk) from a frame this keyring
    # did not write (FrameAuthError), as it does for a reader without keys.
    problem = None if auth is None else _mac_problem(view, header, (meta_bytes, *parts), auth)
    if (auth is None or problem is not None) and _checksum(meta_bytes, parts) != header.checksum:
        raise CorruptChunk("checksum mismatch")
    if problem is not None:
        raise FrameAuthError(problem)
    return _decode_meta(meta_bytes)


def split(frame: bytes | bytearray | memoryview) -> tuple[memoryview, memoryview]:
    """``(head, payload)`` views of a whole frame, after checking its total length."""
    view = memoryview(frame).cast("B")
    header = read_header(view)
    head_len = HEADER_BYTES + header.meta_len
    if len(view) != head_len + header.payload_len:
        raise CorruptChunk(f"frame is {len(view)} bytes, header says {head_len + header.payload_len}")
    return view[:head_len], view[head_len:]


def unpack_meta(frame: bytes | bytearray | memoryview,
                auth: FrameKeys | None = None) -> tuple[ChunkMeta, memoryview]:
    """Verify ``frame`` completely and return its metadata and payload view."""
    head, payload = split(frame)
    return verify_parts(head, payload, auth), payload


def peek_meta(head: bytes | bytearray | memoryview) -> ChunkMeta:
    """Decode the metadata from the first ``HEADER_BYTES + meta_len`` bytes, without checksum or MAC.

    For index rebuilds that read only file heads; the full frame is still verified on every read.
    """
    view = memoryview(head).cast("B")
    header = read_header(view)
    if len(view) < HEADER_BYTES + header.meta_len:
        raise CorruptChunk("truncated metadata")
    return _decode_meta(view[HEADER_BYTES : HEADER_BYTES + header.meta_len])


def check_meta(meta: ChunkMeta, spec: KVSpec, num_tokens: int, expect: ChunkKey | None) -> None:
    """Raise unless ``meta`` names ``expect`` (when given), was written for ``spec`` and holds
    ``num_tokens`` positions."""
    if expect is not None and meta.key != expect:
        raise CorruptChunk(f"frame holds key {meta.key.hex()}, expected {expect.hex()}")
    if meta.spec != spec.fingerprint():
        raise LayoutError(f"chunk was stored for KV spec {meta.spec}, this engine uses {spec.fingerprint()}")
    if num_tokens != meta.num_tokens:
        raise LayoutError(f"destination holds {num_tokens} tokens, chunk has {meta.num_tokens}")


class _FrameKey(msgspec.Struct):
    """The only metadata field :func:`check_frame` reads."""

    key: bytes


_frame_key = msgspec.msgpack.Decoder(_FrameKey)


def check_frame(frame: bytes | bytearray | memoryview, key: ChunkKey) -> tuple[memoryview, memoryview]:
    """The structure a store without the tenant's keys checks before it keeps a frame (the cache
    server): magic, version, flags, lengths, and that the metadata names ``key``. Raise
    :class:`CorruptChunk` otherwise; return ``(head, payload)``. No pass over the payload: its checksum
    is the reader's to verify (:func:`verify_parts`), since anyone can compute one, and a reader never
    trusts a store for it."""
    head, payload = split(frame)
    try:
        named = _frame_key.decode(head[HEADER_BYTES:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptChunk(f"bad metadata record: {exc}") from exc
    if named.key != key:
        raise CorruptChunk(f"frame holds key {named.key.hex()}, request names {key.hex()}")
    return head, payload


def check_intact(frame: bytes | bytearray | memoryview, key: ChunkKey) -> None:
    """:func:`check_frame` plus the checksum: for a store that reloads what it kept (the server's disk)
    and drops damaged copies instead of serving them. Raise :class:`CorruptChunk` otherwise."""
    head, payload = check_frame(frame, key)
    if _checksum(head[HEADER_BYTES:], (payload,)) != read_header(head).checksum:
        raise CorruptChunk("checksum mismatch")
