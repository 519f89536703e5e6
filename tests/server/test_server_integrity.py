"""Integrity is end to end: the server stores a well-formed frame whose payload is damaged (it checks
structure, not the checksum), and every reader still refuses it: the engine as a counted corrupt miss,
the server's own disk reload by discarding it. Real server processes, real engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from server_support import ServerProcess

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.layout import KVSpec
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow

SPEC = KVSpec(num_layers=8, num_kv_heads=4, head_dim=64, dtype="float32", chunk_tokens=16)  # 256 KiB frames:
# PUT bodies move through an I/O thread and MPUT bodies through the one-pass receive (kvtier.server.mput)
TOKENS = np.arange(5_000, 5_000 + 4 * 16, dtype=np.uint32)


def _engine(port: int) -> CacheEngine:
    """An engine with a fresh CPU tier over its own client of the server (closing it closes that client)."""
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16, "cpu": {"capacity": 8 * SPEC.chunk_bytes}})
    return CacheEngine(SPEC, "integrity-test", cfg, tiers=[(RemoteTier("127.0.0.1", port, timeout_s=5.0), "raw")])


def _damaged(frame: bytes) -> bytes:
    bad = bytearray(frame)
    bad[len(bad) - 1000] ^= 0x01  # one payload bit: the structure stays valid
    return bytes(bad)


@pytest.mark.parametrize("op", ["put", "put_many"])
def test_a_damaged_frame_a_client_put_is_stored_and_then_a_counted_miss(tmp_path: Path, op: str) -> None:
    kv = torch.randn(SPEC.chunk_shape(len(TOKENS)), generator=torch.Generator().manual_seed(3))
    with ServerProcess(tmp_path) as srv:
        tier = RemoteTier("127.0.0.1", srv.port, timeout_s=5.0)
        try:
            with _engine(srv.port) as writer:
                writer.store(TOKENS, kv)
                assert writer.storage.flush(30)
            key = writer.chunker.chunks(TOKENS)[1][2].key
            good = tier.get(key)
            assert good is not None
            if op == "put":
                tier.put(key, _damaged(good))
            else:
                tier.put_many([(key, (_damaged(good),))])
            assert tier.stats().get("puts_refused", 0) == 0  # accepted: the server recomputes no checksum
            assert tier.get(key) == _damaged(good)
            assert tier.server_stats().get("refused_corrupt", 0) == 0
            with _engine(srv.port) as reader:
                into = torch.zeros_like(kv)
                assert reader.retrieve(TOKENS, into) == 2 * 16  # the hit ends before the damaged chunk
                assert torch.equal(into[:, :, : 2 * 16], kv[:, :, : 2 * 16])
                assert not into[:, :, 2 * 16 :].any()  # its bytes never reach the caller
                assert reader.stats()["remote"]["corrupt"] == 1
        finally:
            tier.close()


def test_the_servers_disk_reload_discards_a_damaged_frame(tmp_path: Path) -> None:
    persist = tmp_path / "persist"
    kv = torch.randn(SPEC.chunk_shape(len(TOKENS)), generator=torch.Generator().manual_seed(4))
    srv = ServerProcess(tmp_path, persist=persist).start()
    tier = RemoteTier("127.0.0.1", srv.port, timeout_s=5.0)
    try:
        with _engine(srv.port) as writer:
            writer.store(TOKENS, kv)
            assert writer.storage.flush(30)
        keys = [c.key for c in writer.chunker.chunks(TOKENS)[1]]
        good = tier.get(keys[0])
        assert good is not None
        tier.put(keys[0], _damaged(good))  # persisted as given
        assert srv.terminate() == 0
        srv.start()  # same port; memory empty: every get reloads from disk
        assert tier.get(keys[0]) is None
        assert tier.get(keys[1]) is not None
        stats = tier.server_stats()
        assert stats["store_corrupt_on_disk"] == 1 and stats["store_hits_disk"] == 1
        assert tier.exists(keys) == [False, True, True, True]  # the damaged file is gone
    finally:
        tier.close()
        srv.kill()
