"""Agents and engines in the test process against a threaded controller: recovery paths that are slow
or awkward to reach with separate processes (controller restart, event overflow, pin TTL, bad peer)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from cluster_support import ThreadedController, tokens, wait_until

from kvtier.cluster.agent import Agent, start_engine
from kvtier.config import ControllerConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.layout import KVSpec

TOKEN = "agent-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = KVSpec(2, 2, 8, "float32", chunk_tokens=16)
SETTINGS = ControllerConfig(token=TOKEN, ttl_s=3.0, heartbeat_s=0.2, command_timeout_s=5.0)


def kv_for(toks: list[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(toks))
    return torch.randn(SPEC.chunk_shape(len(toks)), generator=gen)


class Node:
    def __init__(self, url: str, name: str, chunks: int = 64, **agent: Any) -> None:
        cfg = load_config(environ={}, overrides={
            "chunk_tokens": 16, "cpu": {"capacity": chunks * SPEC.chunk_bytes},
            "cluster": {"controller_url": url, "instance_id": name, "token": TOKEN, "poll_wait_s": 1.0, **agent}})
        self.engine: CacheEngine
        self.agent: Agent
        self.engine, self.agent = start_engine(SPEC, "m", cfg)
        assert self.agent.wait_registered(10)

    def close(self) -> None:
        self.agent.stop()
        self.engine.close()


@pytest.fixture
def controller() -> Iterator[ThreadedController]:
    ctl = ThreadedController(SETTINGS)
    ctl.start()
    yield ctl
    ctl.stop()


def lookup(port: int, toks: list[int]) -> dict[str, int]:
    resp = httpx.post(f"http://127.0.0.1:{port}/lookup", headers=AUTH, json={"model": "m", "token_ids": toks})
    if resp.status_code == 404:
        return {}
    return {k: v["hit_tokens"] for k, v in resp.json()["instances"].items()}


def test_agent_re_registers_after_a_controller_restart(controller: ThreadedController) -> None:
    node = Node(f"http://127.0.0.1:{controller.port}", "x")
    try:
        t = tokens(1, 48)
        node.engine.store(t, kv_for(t))
        wait_until(lambda: lookup(controller.port, t) == {"x": 48}, 5, "indexed")
        controller.stop()
        fresh = ThreadedController(SETTINGS)
        fresh.start(controller.port)  # a new, empty controller on the same address
        try:
            waited = wait_until(lambda: lookup(fresh.port, t) == {"x": 48}, 10, "re-registered with a snapshot")
            assert waited < 10
            assert node.agent.counters["registrations"] == 2
        finally:
            fresh.stop()
    finally:
        node.close()


def test_event_overflow_falls_back_to_a_snapshot(controller: ThreadedController) -> None:
    node = Node(f"http://127.0.0.1:{controller.port}", "x", event_queue=16, flush_interval_s=0.5)
    try:
        t = tokens(2, 40 * 16)
        node.engine.store(t, kv_for(t))  # 40 admits into a 16-event queue
        wait_until(lambda: lookup(controller.port, t) == {"x": 640}, 5, "snapshot applied")
        assert node.agent.counters["event_overflows"] >= 1 and node.agent.counters["snapshots"] >= 1
    finally:
        node.close()


def test_pin_ttl_expires(controller: ThreadedController) -> None:
    node = Node(f"http://127.0.0.1:{controller.port}", "x")
    try:
        t = tokens(3, 32)
        node.engine.store(t, kv_for(t))
        resp = httpx.post(f"http://127.0.0.1:{controller.port}/pin", headers=AUTH,
                          json={"instance_id": "x", "token_ids": t, "ttl_s": 0.3, "wait_s": 5}).json()
        assert resp["status"] == "done" and resp["result"]["pinned_tokens"] == 32

        def pinned() -> list[bool]:
            out = []
            resident = node.engine.cpu.keys()
            for key in resident:
                slot, _entry = node.engine.cpu.acquire_key(key) or (None, None)
                assert slot is not None
                out.append(node.engine.cpu.arena.pinned(slot))
                node.engine.cpu.release(slot)
            return out

        assert pinned() == [True, True]
        wait_until(lambda: pinned() == [False, False], 3, "pins expired")
    finally:
        node.close()


def test_corrupt_peer_frame_is_rejected_and_recomputed(controller: ThreadedController) -> None:
    url = f"http://127.0.0.1:{controller.port}"
    a, b = Node(url, "a"), Node(url, "b")
    try:
        t = tokens(4, 48)
        kv = kv_for(t)
        a.engine.store(t, kv)
        wait_until(lambda: lookup(controller.port, t) == {"a": 48}, 5, "indexed")
        assert a.agent.peer_server is not None
        store = a.agent.peer_server.store
        real_get = store.get

        async def tampered(tenant: str, key: bytes) -> Any:
            frame = await real_get(tenant, key)
            if frame is None:
                return None
            bad = bytearray(frame)
            bad[-1] ^= 0xFF  # one flipped payload bit
            return bytes(bad)

        store.get = tampered  # type: ignore[method-assign]
        out = torch.zeros_like(kv)
        assert b.engine.retrieve(t, out) == 0 and not out.any()  # a miss: the engine recomputes
        assert b.engine.stats()["p2p"]["corrupt"] == 1
        store.get = real_get  # type: ignore[method-assign]
        wait_until(lambda: b.engine.retrieve(t, out) == 48, 5, "fetched once the peer is honest")
        assert torch.equal(out, kv)
    finally:
        a.close()
        b.close()


def test_chunk_tokens_differing_from_the_config_is_an_error_naming_both(controller: ThreadedController) -> None:
    cfg = load_config(environ={}, overrides={
        "chunk_tokens": 32, "cpu": {"capacity": 8 * SPEC.chunk_bytes},
        "cluster": {"controller_url": f"http://127.0.0.1:{controller.port}", "instance_id": "mismatch",
                    "token": TOKEN}})
    with pytest.raises(ConfigError, match=r"KV spec says 16.*config says 32"):
        start_engine(SPEC, "m", cfg)  # SPEC has 16-token chunks; nothing is rewritten silently
    time.sleep(0.5)
    assert "mismatch" not in controller.app.state.controller.workers  # the agent never registered
