"""Retrieve with and without promotion (``cpu.promote``) from a real ``kvtier server`` over real sockets.

Without promotion a raw frame is received straight into the caller's per-layer K and V rows
(``recvmsg_into`` over the planes) and verified there, the CPU tier is left as it was, and a chunk
counts only once its whole frame verified; other destinations and codecs go through scratch buffers.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from server_support import CuttingProxy, FlippingProxy, ServerProcess, recv_exact

from kvtier import wire
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import TierUnavailable
from kvtier.frames import pack
from kvtier.keys import Chunker, Namespace
from kvtier.layout import KVSpec
from kvtier.record import token_record
from kvtier.storage import remote_protocol as P
from kvtier.storage.remote import RemoteTier
from kvtier.tensors import plane_views

pytestmark = pytest.mark.slow
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
CHUNKS = 8
SECRET = "direct-read test secret, long enough"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("server")) as srv:
        yield srv


def config(promote: bool, *, secret: str = "", slots: int = 64, spec: KVSpec = SPEC) -> Any:
    overrides: dict[str, Any] = {"chunk_tokens": spec.chunk_tokens,
                                 "cpu": {"promote": promote, "capacity": slots * spec.chunk_bytes}}
    if secret:
        overrides["auth"] = {"secret": secret}
    return load_config(environ={}, overrides=overrides)


def prompt(seed: int, spec: KVSpec = SPEC, chunks: int = CHUNKS) -> tuple[np.ndarray, torch.Tensor]:
    tokens = np.arange(seed * 10_000, seed * 10_000 + chunks * spec.chunk_tokens, dtype=np.uint32)
    kv = torch.randn(spec.chunk_shape(len(tokens)), generator=torch.Generator().manual_seed(seed))
    return tokens, kv.to(spec.torch_dtype)


def stored(port: int, seed: int, *, codec: str = "raw", secret: str = "", spec: KVSpec = SPEC,
           model: str = "direct-test") -> tuple[np.ndarray, torch.Tensor]:
    """A prompt whose chunks are on the server (written by an engine of its own)."""
    tokens, kv = prompt(seed, spec)
    tier = RemoteTier("127.0.0.1", port, timeout_s=5.0)
    with CacheEngine(spec, model, config(True, secret=secret, spec=spec), tiers=[(tier, codec)]) as engine:
        assert engine.store(tokens, kv) == len(tokens)
        assert engine.storage.flush(30)
    return tokens, kv


def reader(port: int, promote: bool, *, codec: str = "raw", secret: str = "", spec: KVSpec = SPEC,
           retries: int = 2, slots: int = 64) -> CacheEngine:
    tier = RemoteTier("127.0.0.1", port, timeout_s=5.0, retries=retries)
    cfg = config(promote, secret=secret, slots=slots, spec=spec)
    return CacheEngine(spec, "direct-test", cfg, tiers=[(tier, codec)])


@pytest.mark.parametrize("promote", [True, False])
def test_retrieve_is_exact_and_promotion_decides_what_the_cpu_tier_keeps(server: ServerProcess,
                                                                         promote: bool) -> None:
    tokens, kv = stored(server.port, seed=1 + promote)
    with reader(server.port, promote) as engine:
        for _ in range(2):
            into = torch.full_like(kv, float("nan"))
            assert engine.retrieve(tokens, into) == len(tokens)
            assert torch.equal(into, kv)
        stats = engine.stats()
        if promote:  # the second retrieve was a CPU hit
            assert len(engine.cpu) == CHUNKS and stats["remote"]["hits"] == CHUNKS
            assert stats["engine"]["promoted_chunks"] == CHUNKS and "direct_chunks" not in stats["engine"]
        else:  # nothing admitted: the second retrieve read the server again, straight into ``into``
            assert len(engine.cpu) == 0 and stats["cpu"]["used_bytes"] == 0
            assert stats["remote"]["hits"] == 2 * CHUNKS and stats["remote"]["gets_zero_copy"] == 2 * CHUNKS
            assert stats["engine"]["direct_chunks"] == 2 * CHUNKS and "promoted_chunks" not in stats["engine"]


def test_without_promotion_the_hot_cpu_set_is_not_evicted(server: ServerProcess) -> None:
    remote_tokens, remote_kv = stored(server.port, seed=3)
    hot_tokens, hot_kv = prompt(seed=4)
    with reader(server.port, False, slots=CHUNKS) as engine:  # the CPU tier holds exactly the hot prompt
        assert engine.store(hot_tokens, hot_kv) == len(hot_tokens)
        hot = set(engine.cpu._index)
        into = torch.empty_like(remote_kv)
        assert engine.retrieve(remote_tokens, into) == len(remote_tokens)
        assert torch.equal(into, remote_kv)
        assert set(engine.cpu._index) == hot and engine.cpu.counters["evictions"] == 0
        again = torch.empty_like(hot_kv)
        assert engine.retrieve(hot_tokens, again) == len(hot_tokens) and torch.equal(again, hot_kv)


def test_cpu_hits_and_lower_tier_hits_mix_in_one_retrieve(server: ServerProcess) -> None:
    tokens, kv = stored(server.port, seed=5)
    with reader(server.port, False) as engine:
        half = CHUNKS // 2 * SPEC.chunk_tokens
        assert engine.store(tokens[:half], kv[:, :, :half]) == half  # the first half is in CPU
        into = torch.empty_like(kv)
        assert engine.retrieve(tokens, into) == len(tokens)
        assert torch.equal(into, kv)
        assert engine.stats()["engine"]["direct_chunks"] == CHUNKS // 2 and len(engine.cpu) == CHUNKS // 2


def test_a_partial_last_chunk_is_read_straight_in_too(server: ServerProcess) -> None:
    tokens = np.arange(900_000, 900_000 + 3 * 16 + 5, dtype=np.uint32)
    kv = torch.randn(SPEC.chunk_shape(len(tokens)), generator=torch.Generator().manual_seed(40))
    with CacheEngine(SPEC, "direct-test", config(True), tiers=[(RemoteTier("127.0.0.1", server.port), "raw")]) as e:
        assert e.store(tokens, kv) == len(tokens) and e.storage.flush(30)
    with reader(server.port, False) as engine:
        into = torch.full_like(kv, float("nan"))
        assert engine.retrieve(tokens, into) == len(tokens)
        assert torch.equal(into, kv) and engine.stats()["engine"]["direct_chunks"] == 4


def test_direct_read_into_a_view_of_a_larger_buffer(server: ServerProcess) -> None:
    """The vLLM connector's staging: ``buffer[:, :, :tokens]`` of a longer buffer (planes contiguous,
    the whole not): received in place, and nothing past ``tokens`` is touched."""
    tokens, kv = stored(server.port, seed=6)
    buffer = torch.full(SPEC.chunk_shape(len(tokens) + 40), 7.0)
    with reader(server.port, False) as engine:
        assert engine.retrieve(tokens, buffer[:, :, : len(tokens)]) == len(tokens)
        assert engine.stats()["engine"]["direct_chunks"] == CHUNKS
    assert torch.equal(buffer[:, :, : len(tokens)], kv)
    assert bool((buffer[:, :, len(tokens) :] == 7.0).all())


def test_planes_above_iov_max_are_received_over_several_calls(server: ServerProcess) -> None:
    spec = KVSpec(num_layers=300, num_kv_heads=1, head_dim=4, dtype="float32", chunk_tokens=16)  # 600 planes
    assert 2 * spec.num_layers > P.IOV_MAX
    tokens, kv = stored(server.port, seed=7, spec=spec)
    with reader(server.port, False, spec=spec) as engine:
        into = torch.empty_like(kv)
        assert engine.retrieve(tokens, into) == len(tokens)
        assert torch.equal(into, kv) and engine.stats()["engine"]["direct_chunks"] == CHUNKS


@pytest.mark.parametrize("secret", ["", SECRET])
def test_a_byte_flipped_mid_payload_ends_the_hit_at_that_chunk(server: ServerProcess, secret: str) -> None:
    """Damage in transit inside chunk 3's payload, received straight into ``into``: the hit is exactly
    chunks 0-2 (verified), chunk 3 is a counted corrupt miss (checksum, or MAC then checksum)."""
    tokens, kv = prompt(seed=8 + bool(secret))
    kv[1, 0, 3 * 16 + 8] = torch.arange(2000.0, 2016.0).reshape(2, 8)  # a marker in the middle of chunk 3
    tier = RemoteTier("127.0.0.1", server.port, timeout_s=5.0)
    with CacheEngine(SPEC, "direct-test", config(True, secret=secret), tiers=[(tier, "raw")]) as engine:
        engine.store(tokens, kv)
        assert engine.storage.flush(30)
    proxy = FlippingProxy(server.port, kv[1, 0, 3 * 16 + 8].contiguous().numpy().tobytes())
    try:
        with reader(proxy.address, False, secret=secret) as engine:
            into = torch.zeros_like(kv)
            assert engine.retrieve(tokens, into) == 3 * 16
            assert proxy.flipped == 1
            assert torch.equal(into[:, :, : 3 * 16], kv[:, :, : 3 * 16])
            stats = engine.stats()
            assert stats["remote"]["corrupt"] == 1 and stats["engine"]["direct_chunks"] == 3
            assert len(engine.cpu) == 0
    finally:
        proxy.close()


def test_frames_of_another_tenant_are_refused(server: ServerProcess) -> None:
    tokens, kv = stored(server.port, seed=10, secret="another tenant's secret, also long")
    with reader(server.port, False, secret=SECRET) as engine:
        into = torch.zeros_like(kv)
        assert engine.retrieve(tokens, into) == 0
        assert engine.stats()["remote"]["mac_failures"] == 1


def test_a_truncated_reply_is_a_miss_and_drops_the_connection(server: ServerProcess) -> None:
    tokens, kv = stored(server.port, seed=11)
    frame_bytes = len(pack(token_record(*_first_chunk(tokens)), kv[:, :, :16].contiguous(), SPEC))
    # every connection is cut inside the second frame of its reply stream (after HELLO and EXISTS replies)
    proxy = CuttingProxy(server.port, cut=1024 + frame_bytes * 3 // 2, every=True)
    try:
        with reader(proxy.address, False, retries=0) as engine:
            into = torch.zeros_like(kv)
            assert engine.retrieve(tokens, into) == 16
            assert torch.equal(into[:, :, :16], kv[:, :, :16])
            stats = engine.stats()
            assert stats["remote"]["errors"] >= 1 and stats["remote"]["idle_connections"] == 0
            assert stats["manager"]["read_ahead_dropped"] >= 1 and len(engine.cpu) == 0
    finally:
        proxy.close()


def _first_chunk(tokens: np.ndarray) -> tuple[Any, np.ndarray]:
    arr, chunks = Chunker(Namespace("direct-test", SPEC)).chunks(tokens)
    return chunks[0], arr


def test_non_contiguous_destination_goes_through_scratch(server: ServerProcess) -> None:
    """HF's destination: per-layer K/V as transposed views (planes not contiguous): staged, exact."""
    tokens, kv = stored(server.port, seed=12)
    heads_first = [(torch.empty(SPEC.num_kv_heads, len(tokens), SPEC.head_dim),
                    torch.empty(SPEC.num_kv_heads, len(tokens), SPEC.head_dim)) for _ in range(SPEC.num_layers)]
    into = [(k.transpose(0, 1), v.transpose(0, 1)) for k, v in heads_first]
    assert plane_views(into) is None
    with reader(server.port, False) as engine:
        engine.storage.read_batch = 2  # several batches, read ahead, into the scratch
        assert engine.retrieve(tokens, into) == len(tokens)
        stats = engine.stats()
        assert stats["engine"]["staged_chunks"] == CHUNKS and len(engine.cpu) == 0
    for layer, (k, v) in enumerate(into):
        assert torch.equal(k, kv[layer, 0]) and torch.equal(v, kv[layer, 1])


def test_compressed_frames_go_through_scratch(server: ServerProcess) -> None:
    tokens, kv = stored(server.port, seed=13, codec="zstd")
    with reader(server.port, False, codec="zstd") as engine:
        into = torch.empty_like(kv)
        assert engine.retrieve(tokens, into) == len(tokens)
        assert torch.equal(into, kv) and engine.stats()["engine"]["staged_chunks"] == CHUNKS


def test_compressed_frames_on_a_raw_tier_are_decoded_from_the_whole_frame(server: ServerProcess) -> None:
    """The tier is configured raw but holds zstd frames (another writer's codec): the direct read sees a
    payload of another size, leaves the planes alone, and the whole frame is read and decoded."""
    tokens, kv = stored(server.port, seed=14, codec="zstd")
    with reader(server.port, False, codec="raw") as engine:
        into = torch.empty_like(kv)
        assert engine.retrieve(tokens, into) == len(tokens)
        assert torch.equal(into, kv) and engine.stats()["remote"]["gets_zero_copy"] == 0


def test_layerwise_retrieve_without_promotion(server: ServerProcess) -> None:
    tokens, kv = stored(server.port, seed=15)
    with reader(server.port, False) as engine, engine.layerwise_retrieve(tokens) as layers:
        assert layers.hit_tokens == len(tokens) and len(engine.cpu) == 0
        for layer in range(SPEC.num_layers):
            k, v = torch.empty_like(kv[layer, 0]), torch.empty_like(kv[layer, 1])
            layers.layer(layer, k, v)
            assert torch.equal(k, kv[layer, 0]) and torch.equal(v, kv[layer, 1])


# ---- the tier's scattered receive, against the real server and a lying one -----------------------------
def test_parts_of_the_wrong_total_are_left_alone_and_the_connection_stays_in_step(server: ServerProcess) -> None:
    tokens, kv = stored(server.port, seed=16)
    _arr, chunks = Chunker(Namespace("direct-test", SPEC)).chunks(tokens)
    row = SPEC.bytes_per_token // (2 * SPEC.num_layers)
    short = [bytearray(b"\xee" * 16 * row) for _ in range(2 * SPEC.num_layers - 1)]  # one plane short
    tier = RemoteTier("127.0.0.1", server.port, timeout_s=5.0, pool_size=1)
    try:
        assert tier.get_into_parts(chunks[0].key, [memoryview(b) for b in short]) is None
        assert all(b == b"\xee" * 16 * row for b in short)
        out = torch.empty(SPEC.chunk_shape(16))
        parts = [memoryview(bytearray(16 * row)) for _ in range(2 * SPEC.num_layers)]
        head = tier.get_into_parts(chunks[0].key, parts)
        assert head is not None and wire.verify_parts(head, parts).key == chunks[0].key
        out.view(-1).numpy().view(np.uint8)[:] = np.frombuffer(b"".join(parts), dtype=np.uint8)
        assert torch.equal(out, kv[:, :, :16]) and tier.stats()["connects"] == 1
    finally:
        tier.close()


class _LyingServer:
    """A loopback peer that answers HELLO like a server and every MGET item with ``reply(rid, i)``."""

    def __init__(self, reply: Callable[[int, int], bytes]) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _addr = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                while True:
                    h = P.unpack_header(recv_exact(sock, P.HEADER_BYTES))
                    recv_exact(sock, h.body_len)
                    if h.opcode == P.Op.HELLO:
                        info = msgspec.msgpack.encode(P.ServerInfo(1, False, 1 << 24, 1 << 30, False))
                        sock.sendall(P.pack_header(P.Op.HELLO, h.request_id, body_len=len(info)) + info)
                    else:
                        for i in range(h.key_count):
                            sock.sendall(self.reply(h.request_id, i))
            except (OSError, ConnectionError):
                sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_reply_longer_than_its_frame_drops_the_connection_before_filling_anything() -> None:
    frame = pack(token_record(*_first_chunk(prompt(seed=17)[0])), prompt(seed=17)[1][:, :, :16].contiguous(), SPEC)
    payload_len = wire.read_header(frame).payload_len

    def reply(rid: int, i: int) -> bytes:  # the reply claims 64 bytes more than its frame holds
        body = frame + bytes(64)
        return P.pack_header(P.Op.MGET, rid, key_count=i, body_len=len(body)) + body

    liar = _LyingServer(reply)
    tier = RemoteTier("127.0.0.1", liar.port, timeout_s=5.0, retries=0)
    parts = [memoryview(bytearray(b"\xee" * (payload_len // 4))) for _ in range(4)]
    try:
        with pytest.raises(TierUnavailable, match="holds a frame of"):
            tier.get_into_parts(wire.unpack_meta(frame)[0].key, parts)
        assert all(bytes(p) == b"\xee" * len(p) for p in parts)
        assert tier.stats()["idle_connections"] == 0
    finally:
        tier.close()
        liar.close()
