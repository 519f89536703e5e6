"""Scheduler -> worker lookup socket (no vLLM needed)."""

from __future__ import annotations

import uuid

import numpy as np

from kvtier.integrations.vllm.lookup import LookupClient, LookupServer, socket_path


def test_lookup_round_trip_and_failures() -> None:
    engine_id = uuid.uuid4().hex
    path = socket_path(engine_id)
    seen: list[list[int]] = []

    def lookup(tokens: np.ndarray) -> int:
        seen.append(tokens.tolist())
        if len(tokens) == 3:
            raise RuntimeError("boom")
        return len(tokens) * 2

    client = LookupClient(path, engine_id.encode(), timeout_s=2.0)
    assert client.lookup([1, 2]) == 0 and client.failures == 1  # no server yet: a miss
    server = LookupServer(path, lookup, engine_id.encode())
    try:
        assert client.lookup([1, 2, 70000, 5]) == 8
        assert seen[-1] == [1, 2, 70000, 5]
        assert client.lookup([1, 2, 3]) == 0  # the worker's lookup raised: answered as a miss
        assert client.lookup(list(range(1000))) == 2000  # the connection is still good
        intruder = LookupClient(path, b"wrong key", timeout_s=1.0)
        assert intruder.lookup([1]) == 0
    finally:
        server.close()
    assert client.lookup([1, 2]) == 0  # server gone: a miss, not an exception
