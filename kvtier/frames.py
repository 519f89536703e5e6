"""Tensor side of :mod:`kvtier.wire`: encode a canonical chunk into a frame and decode a verified frame
into a canonical chunk view. Every verification is :mod:`kvtier.wire`'s; this module adds the codec."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier import wire
from kvtier.codec.base import get_codec
from kvtier.errors import CorruptChunk, LayoutError
from kvtier.frame_auth import FrameKeys
from kvtier.keys import ChunkKey
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord


def pack_parts(record: ChunkRecord, kv: torch.Tensor, spec: KVSpec, codec: str = "raw",
               auth: FrameKeys | None = None) -> tuple[bytes, bytes | memoryview]:
    """``(header + metadata, payload)`` of the frame of canonical chunk ``kv`` (``record.num_tokens``
    positions); their concatenation is the frame. The payload may be a view of ``kv``'s memory (raw
    codec), valid while ``kv`` is unchanged: writers pass both parts to ``writev``/``sendmsg`` and
    save one copy. With ``auth`` the frame is authenticated with its current key."""
    payload, params = get_codec(codec).encode(kv, spec)
    return wire.frame_head(record, spec, codec, params, payload, auth), payload


def pack(record: ChunkRecord, kv: torch.Tensor, spec: KVSpec, codec: str = "raw",
         auth: FrameKeys | None = None) -> bytes:
    """:func:`pack_parts`, joined."""
    return b"".join(pack_parts(record, kv, spec, codec, auth))


def unpack_into(frame: bytes | bytearray | memoryview, spec: KVSpec, out: torch.Tensor,
                expect: ChunkKey | None = None, auth: FrameKeys | None = None) -> wire.ChunkMeta:
    """Verify ``frame`` (see :func:`kvtier.wire.verify_parts`) and decode its payload into canonical
    chunk view ``out``, which must have exactly ``meta.num_tokens`` positions. Raise
    :class:`CorruptChunk` on any damage or failed MAC and :class:`LayoutError` if the frame was
    written for another KV spec."""
    meta, payload = wire.unpack_meta(frame, auth)
    wire.check_meta(meta, spec, int(out.shape[2]), expect)
    get_codec(meta.codec).decode(payload, meta.codec_params, spec, out)
    return meta


def payload_view(out: torch.Tensor) -> memoryview | None:
    """Writable bytes of ``out`` where a raw payload can be read straight in, or ``None`` if ``out``
    is not contiguous (or empty)."""
    if not out.is_contiguous() or out.numel() == 0 or out.device.type != "cpu":
        return None
    return out.view(torch.uint8).reshape(-1).numpy().data


def unpack_head_into(head: bytes | bytearray | memoryview, spec: KVSpec, out: torch.Tensor,
                     expect: ChunkKey | None = None, auth: FrameKeys | None = None) -> wire.ChunkMeta:
    """:func:`unpack_into` for a frame split in two: ``head`` (fixed header + metadata) and a payload a
    reader already placed in ``payload_view(out)`` (zero copy). Verifies exactly what
    :func:`unpack_into` does, checksum and MAC included; a payload of a codec other than raw is
    decoded from a copy. On any error ``out`` holds garbage and the caller must not use it."""
    payload = payload_view(out)
    if payload is None:
        raise LayoutError("unpack_head_into needs a contiguous CPU destination")
    meta = wire.verify_parts(head, payload, auth)
    wire.check_meta(meta, spec, int(out.shape[2]), expect)
    if meta.codec != "raw":
        get_codec(meta.codec).decode(memoryview(bytes(payload)), meta.codec_params, spec, out)
    return meta


def unpack_into_parts(data: bytes | bytearray | memoryview, placed: bool, spec: KVSpec,
                      parts: Sequence[memoryview], num_tokens: int, expect: ChunkKey | None = None,
                      auth: FrameKeys | None = None) -> wire.ChunkMeta:
    """Verify a frame of ``num_tokens`` positions whose decoded chunk goes into ``parts`` (buffers whose
    concatenation is the canonical chunk's bytes: scattered destination memory). ``placed``: ``data``
    is the head and a reader already put the raw payload into ``parts`` (zero copy; verified there);
    otherwise ``data`` is the whole frame, verified, then copied (raw) or decoded through a scratch
    chunk (other codecs) into ``parts``. Raises as :func:`unpack_into` does; on any error ``parts``
    hold garbage."""
    if placed:
        meta = wire.verify_parts(data, parts, auth)
        payload = None
    else:
        meta, payload = wire.unpack_meta(data, auth)
    wire.check_meta(meta, spec, num_tokens, expect)
    if meta.codec != "raw":  # decoded into a scratch chunk, then its bytes scattered into the parts
        scratch = torch.empty(spec.chunk_shape(num_tokens), dtype=spec.torch_dtype)
        coded = payload if payload is not None else memoryview(b"".join(parts))
        get_codec(meta.codec).decode(coded, meta.codec_params, spec, scratch)
        payload = payload_view(scratch)
    if payload is not None:
        if payload.nbytes != sum(p.nbytes for p in parts):
            raise CorruptChunk(f"payload of {payload.nbytes} bytes for buffers of {sum(p.nbytes for p in parts)}")
        at = 0
        for part in parts:
            part[:] = payload[at : at + part.nbytes]
            at += part.nbytes
    return meta
