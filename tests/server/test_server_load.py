"""64 concurrent clients for a bounded time: no error, no wrong bytes, server RSS under its cap."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from server_support import ServerProcess, make_frames

from kvtier.layout import KVSpec
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow

CLIENTS = 64
SECONDS = 8.0
CAPACITY = 8 << 20
INFLIGHT = 8 << 20


def test_64_concurrent_clients(tmp_path: Path) -> None:
    small = make_frames(192, seed=31)  # 8 KiB frames
    large = make_frames(48, spec=KVSpec(8, 4, 64, "float32", 16), seed=32)  # 256 KiB frames
    frames = dict(small + large)
    keys = list(frames)
    assert sum(len(f) for f in frames.values()) > CAPACITY  # forces eviction
    env = {"KVTIER_SERVER__MAX_INFLIGHT_BYTES": str(INFLIGHT), "KVTIER_SERVER__MAX_MESSAGE_BYTES": "1MiB"}
    with ServerProcess(tmp_path, capacity=str(CAPACITY), env=env) as srv:
        baseline = srv.rss()
        errors: list[BaseException] = []
        counts = [0] * CLIENTS
        peak = [baseline]
        stop = threading.Event()
        start_line = threading.Barrier(CLIENTS + 1)

        def client(n: int) -> None:
            rnd = random.Random(n)
            tier = RemoteTier("127.0.0.1", srv.port, timeout_s=20.0, pool_size=1)
            try:
                start_line.wait()
                while not stop.is_set():
                    op = rnd.random()
                    batch = rnd.sample(keys, 4)
                    if op < 0.4:
                        key = batch[0]
                        tier.put(key, frames[key])
                    elif op < 0.8:
                        got = tier.get(batch[0])
                        if got is not None and got != frames[batch[0]]:
                            raise AssertionError(f"wrong bytes for key {batch[0].hex()}")
                    elif op < 0.9:
                        got_many = tier.get_many(batch)
                        for key, frame in zip(batch, got_many, strict=True):
                            if frame is not None and frame != frames[key]:
                                raise AssertionError(f"wrong bytes for key {key.hex()}")
                    else:
                        tier.exists(batch)
                    counts[n] += 1
                if tier.stats().get("errors", 0):
                    raise AssertionError(f"client {n} saw errors: {tier.stats()}")
            except BaseException as exc:
                errors.append(exc)
            finally:
                tier.close()

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        start_line.wait()
        deadline = time.monotonic() + SECONDS
        connections_seen = 0
        while time.monotonic() < deadline:
            peak[0] = max(peak[0], srv.rss())
            time.sleep(0.1)
        stats = RemoteTier("127.0.0.1", srv.port, timeout_s=20.0, pool_size=1).server_stats()
        connections_seen = int(stats["connections"])
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not errors, errors[:3]
        assert all(counts), "a client never completed a request"
        assert connections_seen >= CLIENTS
        assert srv.alive()
        final = RemoteTier("127.0.0.1", srv.port, timeout_s=20.0, pool_size=1).server_stats()
        assert final["store_bytes_memory"] <= CAPACITY
        assert final["store_evictions"] > 0
        assert final.get("server_errors", 0) == 0
        # the store cap plus the in-flight cap plus per-connection buffers, with allocator slack
        cap = CAPACITY + INFLIGHT + CLIENTS * (256 << 10) + (32 << 20)
        assert peak[0] - baseline < cap, f"server RSS grew {(peak[0] - baseline) >> 20} MiB (cap {cap >> 20} MiB)"
        print(f"{sum(counts)} requests by {CLIENTS} clients in {SECONDS}s; RSS +{(peak[0] - baseline) >> 20} MiB")


def test_partly_sent_huge_puts_commit_only_what_arrived(tmp_path: Path) -> None:
    """A PUT body is received into one buffer of its announced size, but only received bytes commit
    memory: three 255 MiB PUTs that send 4 MiB each and stall hold their budget, not 765 MiB of RSS."""
    from server_support import stats_of

    from kvtier.storage import remote_protocol as P

    mib = 1 << 20
    (key, _frame), = make_frames(1, seed=33)
    with ServerProcess(tmp_path, capacity="64MiB") as srv:
        baseline = srv.rss()
        stalled = []
        try:
            for rid in range(3):
                sock = srv.connect()
                head = P.pack_header(P.Op.PUT, rid, key_count=1, body_len=P.KEY_BYTES + 255 * mib)
                sock.sendall(head + key + bytes(4 * mib))
                stalled.append(sock)
            deadline = time.monotonic() + 30.0
            while stats_of(srv)["inflight_bytes"] < 3 * 255 * mib:  # all three are inside read_body
                assert time.monotonic() < deadline, stats_of(srv)
                time.sleep(0.1)
            time.sleep(0.5)  # let the stalled receives land what was sent
            growth = srv.rss() - baseline
            assert growth < 64 * mib, f"server RSS grew by {growth / mib:.0f} MiB for 12 MiB of received bodies"
        finally:
            for sock in stalled:
                sock.close()
