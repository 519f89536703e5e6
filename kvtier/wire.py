"""The one serialized form of a chunk, on disk and on the network.

Layout (little endian)::

    offset size  field
    0      4     magic b"KVT1"
    4      2     version (1)
    6      2     flags (0; reserved)
    8      4     meta_len: bytes of the msgpack metadata record
    12     8     payload_len
    20     8     xxh3-64 of metadata bytes followed by payload bytes
    28     ...   metadata (msgspec msgpack of :class:`ChunkMeta`), then payload

Invariant: :func:`unpack` returns only frames whose lengths, checksum, metadata schema and KV spec are
valid; anything else raises :class:`~kvtier.errors.CorruptChunk`. No pickle: the metadata is a typed
msgspec record and the payload is codec bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np
import torch
import xxhash

from kvtier.codec.base import get_codec
from kvtier.errors import CorruptChunk, LayoutError
from kvtier.keys import Chunk, ChunkKey
from kvtier.layout import KVSpec

MAGIC = b"KVT1"
VERSION = 1
HEADER = struct.Struct("<4sHHIQQ")
HEADER_BYTES = HEADER.size
MAX_META_BYTES = 1 << 22


class ChunkMeta(msgspec.Struct, frozen=True):
    """Typed metadata of one chunk."""

    key: bytes
    parent: bytes
    tokens: bytes  # uint32 little-endian token ids of the chunk
    spec: str  # KVSpec.fingerprint()
    codec: str
    codec_params: dict[str, Any]
    num_tokens: int

    def token_array(self) -> np.ndarray:
        return np.frombuffer(self.tokens, dtype="<u4")


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChunkMeta)


def _checksum(meta: bytes | memoryview, payload: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(meta)
    h.update(payload)
    return h.intdigest()


def pack(chunk: Chunk, tokens: np.ndarray, kv: torch.Tensor, spec: KVSpec, codec: str = "raw") -> bytes:
    """Frame canonical chunk tensor ``kv`` (``num_tokens`` positions) with its metadata."""
    return b"".join(pack_parts(chunk, tokens, kv, spec, codec))


def pack_parts(
    chunk: Chunk, tokens: np.ndarray, kv: torch.Tensor, spec: KVSpec, codec: str = "raw",
    extra_params: dict[str, Any] | None = None,
) -> tuple[bytes, bytes | memoryview]:
    """Like :func:`pack` but without joining: ``(header + metadata, payload)``, whose concatenation is
    the frame. The payload may be a view of ``kv``'s memory (raw codec), valid while ``kv`` is unchanged;
    writers pass both parts to ``writev``/``sendmsg`` and save one copy of the payload. ``extra_params``
    are merged into the metadata's ``codec_params`` (e.g. the namespace of a probe marker)."""
    encoder = get_codec(codec)
    payload, params = encoder.encode(kv, spec)
    if extra_params:
        params = {**params, **extra_params}
    meta = _encoder.encode(
        ChunkMeta(
            key=chunk.key,
            parent=chunk.parent,
            tokens=tokens[chunk.start : chunk.end].astype("<u4").tobytes(),
            spec=spec.fingerprint(),
            codec=codec,
            codec_params=params,
            num_tokens=chunk.num_tokens,
        )
    )
    payload_len = memoryview(payload).nbytes
    header = HEADER.pack(MAGIC, VERSION, 0, len(meta), payload_len, _checksum(meta, payload))
    return header + meta, payload


def read_header(frame: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Validate the fixed header; return ``(meta_len, payload_len, checksum)``."""
    if len(frame) < HEADER_BYTES:
        raise CorruptChunk(f"frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, _flags, meta_len, payload_len, checksum = HEADER.unpack_from(frame, 0)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CorruptChunk(f"unsupported wire version {version}, expected {VERSION}")
    if meta_len > MAX_META_BYTES:
        raise CorruptChunk(f"metadata length {meta_len} exceeds {MAX_META_BYTES}")
    return meta_len, payload_len, checksum


def _verified_meta(meta_bytes: memoryview, payload: bytes | memoryview, checksum: int) -> ChunkMeta:
    """Check ``checksum`` over metadata + payload, then decode and sanity-check the metadata record."""
    if _checksum(meta_bytes, payload) != checksum:
        raise CorruptChunk("checksum mismatch")
    try:
        meta = _decoder.decode(meta_bytes)
    except msgspec.DecodeError as exc:
        raise CorruptChunk(f"bad metadata record: {exc}") from exc
    if len(meta.tokens) != 4 * meta.num_tokens:
        raise CorruptChunk(f"metadata holds {len(meta.tokens) // 4} token ids for {meta.num_tokens} tokens")
    return meta


def unpack_meta(frame: bytes | bytearray | memoryview) -> tuple[ChunkMeta, memoryview]:
    """Verify ``frame`` completely and return its metadata and payload view."""
    view = memoryview(frame).cast("B")
    meta_len, payload_len, checksum = read_header(view)
    total = HEADER_BYTES + meta_len + payload_len
    if len(view) != total:
        raise CorruptChunk(f"frame is {len(view)} bytes, header says {total}")
    meta_bytes = view[HEADER_BYTES : HEADER_BYTES + meta_len]
    payload = view[HEADER_BYTES + meta_len :]
    meta = _verified_meta(meta_bytes, payload, checksum)
    return meta, payload


def peek_meta(head: bytes | bytearray | memoryview) -> ChunkMeta:
    """Decode the metadata from the first ``HEADER_BYTES + meta_len`` bytes, without the checksum.

    For index rebuilds that read only file heads; the full frame is still verified on every read.
    """
    view = memoryview(head).cast("B")
    meta_len, _payload_len, _checksum_value = read_header(view)
    if len(view) < HEADER_BYTES + meta_len:
        raise CorruptChunk("truncated metadata")
    try:
        return _decoder.decode(view[HEADER_BYTES : HEADER_BYTES + meta_len])
    except msgspec.DecodeError as exc:
        raise CorruptChunk(f"bad metadata record: {exc}") from exc


def unpack_into(
    frame: bytes | bytearray | memoryview, spec: KVSpec, out: torch.Tensor, expect: ChunkKey | None = None
) -> ChunkMeta:
    """Verify ``frame`` and decode its payload into canonical chunk view ``out``.

    ``out`` must have exactly ``meta.num_tokens`` positions; raise :class:`CorruptChunk` on any damage
    and :class:`LayoutError` if the frame was written for another KV spec.
    """
    meta, payload = unpack_meta(frame)
    _check_meta(meta, spec, out, expect)
    get_codec(meta.codec).decode(payload, meta.codec_params, spec, out)
    return meta


def _check_meta(meta: ChunkMeta, spec: KVSpec, out: torch.Tensor, expect: ChunkKey | None) -> None:
    if expect is not None and meta.key != expect:
        raise CorruptChunk(f"frame holds key {meta.key.hex()}, expected {expect.hex()}")
    if meta.spec != spec.fingerprint():
        raise LayoutError(f"chunk was stored for KV spec {meta.spec}, this engine uses {spec.fingerprint()}")
    if out.shape[2] != meta.num_tokens:
        raise LayoutError(f"destination holds {out.shape[2]} tokens, chunk has {meta.num_tokens}")


def payload_view(out: torch.Tensor) -> memoryview | None:
    """Writable bytes of ``out`` where a raw payload can be read straight in, or ``None`` if ``out``
    is not contiguous (or empty)."""
    if not out.is_contiguous() or out.numel() == 0 or out.device.type != "cpu":
        return None
    return out.view(torch.uint8).reshape(-1).numpy().data


def unpack_head_into(
    head: bytes | bytearray | memoryview, spec: KVSpec, out: torch.Tensor, expect: ChunkKey | None = None
) -> ChunkMeta:
    """:func:`unpack_into` for a frame split in two: ``head`` (fixed header + metadata) and a payload a
    reader already placed in ``payload_view(out)`` (zero copy). Verifies exactly what
    :func:`unpack_into` does, checksum included; a payload of a codec other than raw is decoded from a
    copy. On any error ``out`` holds garbage and the caller must not use it."""
    view = memoryview(head).cast("B")
    meta_len, payload_len, checksum = read_header(view)
    payload = payload_view(out)
    if payload is None:
        raise LayoutError("unpack_head_into needs a contiguous CPU destination")
    if len(view) != HEADER_BYTES + meta_len or payload_len != payload.nbytes:
        raise CorruptChunk(
            f"head of {len(view)} bytes and payload of {payload.nbytes} bytes, header says "
            f"{HEADER_BYTES + meta_len} and {payload_len}"
        )
    meta_bytes = view[HEADER_BYTES:]
    meta = _verified_meta(meta_bytes, payload, checksum)
    _check_meta(meta, spec, out, expect)
    if meta.codec != "raw":
        get_codec(meta.codec).decode(memoryview(bytes(payload)), meta.codec_params, spec, out)
    return meta
