"""Streaming zero-copy reads (``RemoteTier.get_each_into``) against a real ``kvtier server``: each chunk is
handed over as soon as its payload is in place, exactly once and in order, also across a connection cut
mid-stream (the retry asks only for what was not handed over); a consumer that stops the stream drops
the connection and nothing more is written into its buffers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from server_support import CuttingProxy, FlippingProxy, ServerProcess, make_frames

from kvtier import wire
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.frames import pack
from kvtier.keys import Chunker, Namespace
from kvtier.layout import KVSpec
from kvtier.record import token_record
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow
FILL = 0xAB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("server")) as srv:
        yield srv


def _stored(port: int, n: int, seed: int) -> tuple[list[bytes], list[bytes], int]:
    """``n`` frames stored on the server at ``port``: their keys, frames and head length."""
    frames = make_frames(n, seed=seed)
    tier = RemoteTier("127.0.0.1", port, timeout_s=5.0)
    tier.put_many([(k, (f,)) for k, f in frames])
    tier.close()
    head_len = len(frames[0][1]) - wire.read_header(frames[0][1]).payload_len
    return [k for k, _f in frames], [f for _k, f in frames], head_len


def _dests(frames: list[bytes], head_len: int) -> list[memoryview]:
    return [memoryview(bytearray([FILL]) * (len(f) - head_len)) for f in frames]


def _untouched(view: memoryview) -> bool:
    return bytes(view) == bytes([FILL]) * len(view)


def test_each_chunk_is_handed_over_before_the_next_is_received(server: ServerProcess) -> None:
    keys, frames, head_len = _stored(server.port, 4, seed=71)
    dests = _dests(frames, head_len)
    seen: list[int] = []

    def fn(i: int, head: bytes | memoryview | None) -> None:
        assert head is not None and bytes(head) == frames[i][:head_len]
        assert bytes(dests[i]) == frames[i][head_len:]
        assert all(_untouched(d) for d in dests[i + 1 :])  # the next payloads are not received yet
        seen.append(i)

    tier = RemoteTier("127.0.0.1", server.port, timeout_s=5.0)
    tier.get_each_into(keys, dests, fn)
    assert seen == [0, 1, 2, 3]
    assert tier.stats()["gets_zero_copy"] == 4
    tier.close()


class _Stop(Exception):
    pass


def test_a_consumer_that_stops_drops_the_connection(server: ServerProcess) -> None:
    keys, frames, head_len = _stored(server.port, 4, seed=72)
    dests = _dests(frames, head_len)

    def fn(i: int, _head: bytes | memoryview | None) -> None:
        if i == 1:
            raise _Stop

    tier = RemoteTier("127.0.0.1", server.port, timeout_s=5.0, pool_size=1)
    with pytest.raises(_Stop):
        tier.get_each_into(keys, dests, fn)
    assert all(_untouched(d) for d in dests[2:])
    assert tier.stats()["idle_connections"] == 0  # its reply stream was not read to the end
    assert tier.get_many_into(keys, dests)[3] is not None  # a fresh connection, in step
    assert bytes(dests[3]) == frames[3][head_len:]
    assert tier.stats()["connects"] == 2
    tier.close()


def test_a_cut_mid_stream_resumes_without_handing_a_chunk_over_twice(server: ServerProcess) -> None:
    keys, frames, head_len = _stored(server.port, 4, seed=73)
    dests = _dests(frames, head_len)
    proxy = CuttingProxy(server.port, cut=1024 + len(frames[0]) * 3 // 2)  # HELLO reply, frame 0, half of 1
    seen: list[int] = []
    tier = RemoteTier("127.0.0.1", proxy.address, timeout_s=5.0)
    try:
        tier.get_each_into(keys, dests, lambda i, head: seen.append(i) if head is not None else None)
    finally:
        tier.close()
        proxy.close()
    assert seen == [0, 1, 2, 3]
    assert [bytes(d) for d in dests] == [f[head_len:] for f in frames]
    assert tier.stats()["retries"] >= 1 and proxy.accepted == 2


def test_engine_stream_reads_verify_every_chunk(server: ServerProcess) -> None:
    """Through the storage manager: a chunk damaged on the server ends the hit there (prefix), the
    chunks before it are returned verified, and no read is left writing into the CPU tier."""
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
    tier = RemoteTier("127.0.0.1", server.port, timeout_s=5.0)
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16})
    tokens = np.arange(5_000, 5_000 + 8 * 16, dtype=np.uint32)
    kv = torch.randn(spec.chunk_shape(len(tokens)), generator=torch.Generator().manual_seed(3))
    with CacheEngine(spec, "stream-test", cfg, tiers=[(tier, "raw")]) as engine:
        engine.store(tokens, kv)
        assert engine.storage.flush(30)
        engine.cpu.clear()
        into = torch.zeros_like(kv)
        assert engine.retrieve(tokens, into) == len(tokens)
        assert torch.equal(into, kv)
        engine.cpu.clear()
        arr, chunks = Chunker(Namespace("stream-test", spec, tenant=cfg.tenant)).chunks(tokens)
        # a valid frame under chunk 5's key holding other token ids: the server (which checks frames
        # only) keeps it, the client's record check refuses it
        record = token_record(chunks[5], arr)._replace(identity=bytes(64))
        tier.put(chunks[5].key, pack(record, kv[:, :, 80:96].contiguous(), spec))
        into = torch.zeros_like(kv)
        assert engine.retrieve(tokens, into) == 5 * 16
        assert torch.equal(into[:, :, : 5 * 16], kv[:, :, : 5 * 16])
        assert not into[:, :, 5 * 16 :].any()
        stats = engine.stats()
        assert stats["remote"]["collisions"] == 1 and stats["manager"]["read_ahead_dropped"] == 2


def test_engine_counts_a_byte_flipped_in_transit_mid_frame_as_a_miss(server: ServerProcess) -> None:
    """A byte damaged on the wire in the middle of a chunk's payload (received straight into the CPU
    tier's slot): the chunk is a counted corrupt miss, the hit ends before it, the chunks before it are
    verified and returned, and nothing at or after the damaged chunk is reported written."""
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16})
    tokens = np.arange(9_000, 9_000 + 8 * 16, dtype=np.uint32)
    kv = torch.randn(spec.chunk_shape(len(tokens)), generator=torch.Generator().manual_seed(5))
    kv[1, 0, 3 * 16 + 8] = torch.arange(1000.0, 1016.0).reshape(2, 8)  # a marker in chunk 3's payload middle
    direct = RemoteTier("127.0.0.1", server.port, timeout_s=5.0)
    with CacheEngine(spec, "flip-test", cfg, tiers=[(direct, "raw")]) as engine:
        engine.store(tokens, kv)
        assert engine.storage.flush(30)
    proxy = FlippingProxy(server.port, kv[1, 0, 3 * 16 + 8].contiguous().numpy().tobytes())
    tier = RemoteTier("127.0.0.1", proxy.address, timeout_s=5.0)
    try:
        with CacheEngine(spec, "flip-test", cfg, tiers=[(tier, "raw")]) as engine:
            into = torch.zeros_like(kv)
            assert engine.retrieve(tokens, into) == 3 * 16
            assert proxy.flipped == 1
            assert torch.equal(into[:, :, : 3 * 16], kv[:, :, : 3 * 16])
            assert not into[:, :, 3 * 16 :].any()
            stats = engine.stats()
            assert stats["remote"]["corrupt"] == 1 and stats["remote"]["gets_zero_copy"] >= 4
    finally:
        proxy.close()
