"""Codecs through the wire format: pack/unpack_into with codec=..., damage and spec mismatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_support import ALL, LOSSY, assert_within_bound, kv_like, spec_for

from kvtier.errors import CorruptChunk, LayoutError
from kvtier.frames import pack, unpack_into
from kvtier.keys import Chunker, Namespace
from kvtier.record import token_record

REGISTERED = ["raw", "zstd", "lz4", "int8", "fp8", "kivi", "cachegen", "cachegen-ans"]


def frame_for(codec: str, tokens: int = 32) -> tuple[bytes, torch.Tensor, object]:
    spec = spec_for("bfloat16", chunk=32)
    arr, chunks = Chunker(Namespace("m", spec, codec)).chunks(np.arange(100, 100 + tokens))
    kv = kv_like(spec, tokens, seed=11)
    return pack(token_record(chunks[0], arr), kv, spec, codec=codec), kv, chunks[0]


@pytest.mark.parametrize("codec", REGISTERED)
def test_wire_round_trip(codec: str) -> None:
    frame, kv, chunk = frame_for(codec)
    spec = spec_for("bfloat16", chunk=32)
    out = torch.zeros_like(kv)
    meta = unpack_into(frame, spec, out, expect=chunk.key)  # type: ignore[attr-defined]
    assert meta.codec == codec and meta.codec_params.get("T", 32) == 32
    if ALL[codec].lossless:
        assert torch.equal(out, kv)
    else:
        assert_within_bound(LOSSY[codec], kv, out)
    if codec in ("cachegen", "cachegen-ans", "kivi"):
        assert len(frame) < kv.numel() * 2 * 0.6  # actually compressed, header and token ids included


@pytest.mark.parametrize("codec", REGISTERED)
def test_wire_damage_is_a_corrupt_chunk(codec: str) -> None:
    frame, kv, _chunk = frame_for(codec)
    spec = spec_for("bfloat16", chunk=32)
    rng = np.random.default_rng(0)
    for pos in [*rng.integers(0, len(frame), 6).tolist(), len(frame) - 1]:
        bad = bytearray(frame)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptChunk):
            unpack_into(bytes(bad), spec, torch.zeros_like(kv))
    with pytest.raises(CorruptChunk):
        unpack_into(frame[:-1], spec, torch.zeros_like(kv))


@pytest.mark.parametrize("codec", REGISTERED)
def test_wire_other_spec_is_a_layout_error(codec: str) -> None:
    frame, _kv, _chunk = frame_for(codec)
    other = spec_for("float16", chunk=32)
    with pytest.raises(LayoutError):
        unpack_into(frame, other, torch.zeros(other.chunk_shape(32), dtype=torch.float16))


def test_wire_partial_chunk_with_cachegen() -> None:
    frame, kv, _chunk = frame_for("cachegen", tokens=9)
    out = torch.zeros_like(kv)
    unpack_into(frame, spec_for("bfloat16", chunk=32), out)
    assert_within_bound(LOSSY["cachegen"], kv, out)


def test_page_record_round_trips_as_a_page() -> None:
    from kvtier.record import ChunkRecord, Kind

    spec = spec_for("bfloat16", chunk=32)
    kv = kv_like(spec, 32, seed=3)
    record = ChunkRecord(b"\7" * 16, b"\0" * 16, bytes(range(32)), Kind.PAGE, 32)
    meta = unpack_into(pack(record, kv, spec), spec, torch.zeros_like(kv), record.key)
    assert meta.record() == record and meta.kind == Kind.PAGE


def test_version_1_frames_and_bad_flags_are_corrupt() -> None:
    frame, kv, _chunk = frame_for("raw")
    spec = spec_for("bfloat16", chunk=32)
    old = bytearray(frame)
    old[4:6] = (1).to_bytes(2, "little")
    with pytest.raises(CorruptChunk, match="unsupported wire version 1"):
        unpack_into(bytes(old), spec, torch.zeros_like(kv))
    flagged = bytearray(frame)
    flagged[6] = 1  # claims a MAC but names no key
    with pytest.raises(CorruptChunk, match="flags"):
        unpack_into(bytes(flagged), spec, torch.zeros_like(kv))


def test_a_version_1_file_in_a_disk_tier_is_quarantined_at_start(tmp_path) -> None:
    from kvtier.storage.disk import DiskTier, chunk_path

    frame, _kv, chunk = frame_for("raw")
    old = bytearray(frame)
    old[4:6] = (1).to_bytes(2, "little")
    path = chunk_path(tmp_path, chunk.key)  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(old))
    tier = DiskTier(tmp_path, 1 << 20)
    try:
        assert tier.exists([chunk.key]) == [False]  # type: ignore[attr-defined]
        assert tier.stats()["quarantined"] == 1 and not path.exists()
    finally:
        tier.close()
