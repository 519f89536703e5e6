"""Server killed and restarted under a CacheEngine, persistence, graceful SIGTERM."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from server_support import SPEC, ServerProcess, hello, make_frames, read_reply, read_until_closed

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.storage import remote_protocol as P
from kvtier.storage.disk import DiskTier
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow


def _engine(tier: RemoteTier) -> CacheEngine:
    cfg = load_config(environ={}, overrides={"chunk_tokens": SPEC.chunk_tokens,
                                             "cpu": {"capacity": 64 * SPEC.chunk_bytes}})
    return CacheEngine(SPEC, "fault-test", cfg, tiers=[(tier, "raw")])


def _prompt(seed: int, n: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, n).astype(np.uint32)
    kv = torch.randn(SPEC.chunk_shape(n), generator=torch.Generator().manual_seed(seed))
    return tokens, kv


def _hits_from_remote(engine: CacheEngine, tokens: np.ndarray, kv: torch.Tensor) -> bool:
    """Store through CPU to the remote tier, drop the CPU copy, and retrieve: True if it came back."""
    engine.cpu.clear()
    engine.store(tokens, kv)
    engine.storage.flush(10)
    engine.cpu.clear()
    out = torch.zeros_like(kv)
    if engine.retrieve(tokens, out) != len(tokens):
        return False
    assert torch.equal(out, kv)
    return True


def test_engine_keeps_serving_through_kill_and_restart(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path).start()
    tier = RemoteTier("127.0.0.1", srv.port, timeout_s=2.0, pool_size=2)
    engine = _engine(tier)
    try:
        stored = [_prompt(i) for i in range(4)]
        for tokens, kv in stored:
            assert _hits_from_remote(engine, tokens, kv)
        assert tier.server_stats()["store_chunks_memory"] == 16
        connects_before = tier.stats()["connects"]

        srv.kill()  # SIGKILL mid-workload: memory-only server loses everything
        engine.cpu.clear()
        slowest = 0.0
        deadline = time.monotonic() + 1.5
        i = 100
        while time.monotonic() < deadline:
            tokens, kv = stored[i % 4]
            start = time.perf_counter()
            assert engine.lookup(tokens) == 0
            assert engine.retrieve(tokens, torch.zeros_like(kv)) == 0
            fresh, fresh_kv = _prompt(i)
            engine.store(fresh, fresh_kv)  # CPU store works; the write-back fails quietly
            slowest = max(slowest, time.perf_counter() - start)
            engine.cpu.clear()
            i += 1
        assert slowest < 0.5, f"a call took {slowest:.3f}s while the server was down"
        assert engine.stats()["remote"]["healthy"] == 0

        srv.start()  # same port, empty store
        tokens, kv = _prompt(999)
        deadline = time.monotonic() + 30
        while not _hits_from_remote(engine, tokens, kv):
            assert time.monotonic() < deadline, "hits from the restarted server never resumed"
            time.sleep(0.1)
        assert tier.stats()["connects"] > connects_before  # reconnected by itself
        assert engine.stats()["remote"]["healthy"] == 1
    finally:
        engine.close()
        srv.kill()


def test_persisted_data_survives_sigkill(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, persist=tmp_path / "persist", capacity="64KiB").start()
    try:
        tier = RemoteTier("127.0.0.1", srv.port, timeout_s=5.0, pool_size=1)
        frames = make_frames(20, seed=5)  # ~170 KB: more than memory holds, all of it on disk
        tier.put_many([(k, (f,)) for k, f in frames])
        assert tier.stats()["puts"] == 20
        engine = _engine(RemoteTier("127.0.0.1", srv.port, timeout_s=5.0, pool_size=1))
        tokens, kv = _prompt(77)
        assert _hits_from_remote(engine, tokens, kv)
        srv.kill()
        srv.start()
        engine.cpu.clear()
        out = torch.zeros_like(kv)
        deadline = time.monotonic() + 20  # the manager may still be backing off from the outage
        while engine.retrieve(tokens, out) != len(tokens):
            assert time.monotonic() < deadline, "persisted chunks did not come back through the engine"
            time.sleep(0.1)
        assert torch.equal(out, kv)
        engine.close()
        assert tier.get_many([k for k, _ in frames]) == [f for _k, f in frames]
        assert tier.exists([k for k, _ in frames]) == [True] * 20
        listed = tier.list_keys()
        assert listed == sorted(listed) and len(listed) == 24 and {k for k, _ in frames} <= set(listed)
        stats = tier.server_stats()
        assert stats["store_disk_chunks"] == 24 and stats["store_hits_disk"] >= 20  # 20 frames + 4 chunks
        assert tier.delete(frames[0][0]) and not tier.exists([frames[0][0]])[0]
        tier.close()
    finally:
        srv.kill()


def test_sigterm_finishes_in_flight_request_then_exits(tmp_path: Path) -> None:
    persist = tmp_path / "persist"
    srv = ServerProcess(tmp_path, persist=persist).start()
    (key, frame), = make_frames(1, spec=type(SPEC)(16, 4, 64, "float32", 16), seed=8)  # ~1 MiB
    idle = srv.connect()
    idle.sendall(hello())
    read_reply(idle)
    busy = srv.connect()
    busy.sendall(hello())
    read_reply(busy)
    body = key + frame
    busy.sendall(P.pack_header(P.Op.PUT, 2, key_count=1, body_len=len(body)) + body[: len(body) // 2])
    time.sleep(0.2)
    try:
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert read_until_closed(idle, 5.0) == b""  # idle connections are closed at once
        deadline = time.monotonic() + 5
        while True:  # and the listener is gone
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "server still accepts connections after SIGTERM"
            time.sleep(0.05)
        assert srv.alive()  # still finishing the PUT
        busy.sendall(body[len(body) // 2 :])
        h, _b = read_reply(busy)
        assert (h.request_id, h.status) == (2, P.Status.OK)
        assert read_until_closed(busy, 5.0) == b""
        assert srv.proc.wait(15) == 0  # type: ignore[union-attr]
    finally:
        idle.close()
        busy.close()
        srv.kill()
    disk = DiskTier(persist, 1 << 30)  # the acknowledged PUT is on disk
    try:
        assert disk.get(key) == frame
    finally:
        disk.close()
