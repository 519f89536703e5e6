"""The cache server acknowledges a PUT only when what it promised is true (persisted, with
persistence on); an oversize PUT is an error the client counts, and costs no earlier chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_attack import ServerProcess, make_frames

from kvtier.layout import KVSpec
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow

BIG = KVSpec(num_layers=8, num_kv_heads=8, head_dim=64, dtype="float32", chunk_tokens=64)  # ~2 MiB frames


def test_oversize_put_is_refused_and_earlier_chunks_survive_restart(tmp_path: Path) -> None:
    small = make_frames(8, seed=11)
    (big_key, big_frame), = make_frames(1, spec=BIG, seed=12)
    srv = ServerProcess(tmp_path, persist=tmp_path / "persist", capacity="64MiB",
                        env={"KVTIER_SERVER__PERSIST_CAPACITY": "1MiB"}).start()
    try:
        tier = RemoteTier("127.0.0.1", srv.port, timeout_s=10.0, pool_size=1)
        for key, frame in small:
            tier.put(key, frame)
        tier.put(big_key, big_frame)  # fits in memory (64 MiB) but not in the promised persistence (1 MiB)
        assert tier.stats()["puts"] == len(small)
        assert tier.stats()["puts_refused"] == 1
        tier.put_many([(big_key, (big_frame,)), *((k, (f,)) for k, f in small[:2])])  # batched: same rule
        assert tier.stats()["puts_refused"] == 2 and tier.stats()["puts"] == len(small) + 2
        tier.close()
        srv.kill()  # no graceful shutdown: only what was persisted survives
        srv.start()
        tier = RemoteTier("127.0.0.1", srv.port, timeout_s=10.0, pool_size=1)
        assert tier.get_many([k for k, _f in small]) == [f for _k, f in small]
        assert tier.get(big_key) is None
        tier.close()
    finally:
        srv.kill()

