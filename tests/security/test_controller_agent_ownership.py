"""A real agent (with its engine) keeps its instance id: an impostor holding the same worker token cannot
take the id over, before or after the agent's session expired, while the agent itself registers the
id again with the secret it was issued."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from kvtier.cluster.agent import start_engine
from kvtier.config import ControllerConfig, load_config
from kvtier.layout import KVSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from cluster_support import ThreadedController, wait_until

TOKEN = "ownership-test"
SPEC = KVSpec(2, 2, 8, "float32", chunk_tokens=16)


def impostor(url: str) -> httpx.Response:
    body = {"instance_id": "x", "model": "m", "spec": SPEC.fingerprint(), "root": "cd" * 16, "chunk_tokens": 16,
            "p2p_address": "127.0.0.1:6666", "replace": True}
    return httpx.post(f"{url}/v1/worker/register", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=10)


def test_agent_keeps_its_id_across_an_expiry() -> None:
    controller = ThreadedController(ControllerConfig(token=TOKEN, ttl_s=1.0, heartbeat_s=0.2))
    url = controller.start()
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16, "cpu": {"capacity": 8 * SPEC.chunk_bytes},
                                             "cluster": {"controller_url": url, "instance_id": "x", "token": TOKEN,
                                                         "poll_wait_s": 0.5}})
    engine, agent = start_engine(SPEC, "m", cfg)
    try:
        assert agent.wait_registered(10)
        ctl = controller.app.state.controller
        address = ctl.workers["x"].info.p2p_address
        assert impostor(url).status_code == 403
        first = ctl.workers["x"]

        def expired_and_back() -> bool:
            first.last_seen = time.monotonic() - 60  # as if silent, until the controller's sweeper drops it
            return agent.counters["registrations"] == 2

        wait_until(expired_and_back, 10, "the agent registered its id again")
        assert ctl.workers["x"] is not first
        assert ctl.workers["x"].info.p2p_address == address
        assert impostor(url).status_code == 403
    finally:
        agent.stop()
        engine.close()
        controller.stop()
