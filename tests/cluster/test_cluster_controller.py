"""The controller in process (FastAPI TestClient), with workers simulated over the worker channel."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kvtier.cluster.controller import create_app
from kvtier.cluster.index import chain_keys
from kvtier.config import ControllerConfig
from kvtier.errors import ConfigError

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = "ab" * 16


def register_full(client: TestClient, name: str, root: str = ROOT, **extra: Any) -> dict[str, Any]:
    body = {"instance_id": name, "model": "m", "spec": "L2-H2-D8-float32-C4", "root": root, "chunk_tokens": 4,
            "codecs": ["raw"], "p2p_address": f"127.0.0.1:{1000 + len(name)}", **extra}
    resp = client.post("/v1/worker/register", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def register(client: TestClient, name: str, root: str = ROOT, **extra: Any) -> str:
    session: str = register_full(client, name, root, **extra)["session"]
    return session


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(ControllerConfig(token=TOKEN, ttl_s=0.4, heartbeat_s=0.1, command_timeout_s=2.0,
                                        max_body_bytes=1 << 16))
    with TestClient(app) as c:
        yield c


def keys_of(toks: list[int], root: str = ROOT) -> list[str]:
    return [key.hex() for _end, key in chain_keys(bytes.fromhex(root), np.asarray(toks, "<u4"), 4)]


def test_refuses_public_bind_without_token() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        ControllerConfig(host="0.0.0.0").check()
    ControllerConfig(host="0.0.0.0", token="x").check()
    ControllerConfig().check()


def test_registration_conflict_and_replace(client: TestClient) -> None:
    first = register_full(client, "a")
    body = {"instance_id": "a", "model": "m", "spec": "s", "root": ROOT, "chunk_tokens": 4}
    # without the id's secret: refused, with replace too
    for replace in (False, True):
        resp = client.post("/v1/worker/register", headers=AUTH, json={**body, "replace": replace})
        assert resp.status_code == 403 and "secret" in resp.json()["detail"]
    resp = client.post("/v1/worker/register", headers=AUTH, json={**body, "secret": first["secret"]})
    assert resp.status_code == 409 and "live session" in resp.json()["detail"]
    second = register_full(client, "a", replace=True, secret=first["secret"])
    assert second["session"] != first["session"] and second["secret"] == first["secret"]
    assert client.post("/v1/worker/heartbeat", json={"session": first["session"]}, headers=AUTH).status_code == 404
    # a clean deregistration frees the id
    assert client.post("/v1/worker/deregister", json={"session": second["session"]}, headers=AUTH).status_code == 200
    assert register_full(client, "a")["secret"] != first["secret"]


def test_event_sequence_gap_asks_for_a_snapshot(client: TestClient) -> None:
    s = register(client, "a")
    ks = keys_of(list(range(12)))
    ev = {"kind": "admit", "tier": "cpu", "keys": ks[:1]}
    assert client.post("/v1/worker/events", headers=AUTH, json={"session": s, "seq": 1, "events": [ev]}).json() == {
        "seq": 1}
    # a retried batch is acknowledged, not applied twice; a gap is refused
    assert client.post("/v1/worker/events", headers=AUTH, json={"session": s, "seq": 1, "events": [ev]}).status_code \
        == 200
    gap = client.post("/v1/worker/events", headers=AUTH, json={"session": s, "seq": 3, "events": [ev]})
    assert gap.status_code == 409 and "snapshot" in gap.json()["detail"]
    snap = client.post("/v1/worker/snapshot", headers=AUTH, json={"session": s, "seq": 5, "tiers": {"cpu": ks}})
    assert snap.json() == {"seq": 5}
    hit = client.post("/lookup", headers=AUTH, json={"model": "m", "token_ids": list(range(12))}).json()
    assert hit["instances"] == {"a": {"hit_tokens": 12, "hit_chunks": 3}}


def test_silent_worker_expires_with_its_index_entries(client: TestClient) -> None:
    s = register(client, "a", tiers={"cpu": keys_of([1, 2, 3, 4])})
    assert client.get("/health").json()["index_keys"] == 1
    time.sleep(0.8)
    assert client.get("/instances", headers=AUTH).json()["instances"] == []
    assert client.get("/health").json()["index_keys"] == 0
    assert client.post("/v1/worker/heartbeat", json={"session": s}, headers=AUTH).status_code == 404


def test_locate_skips_self_and_other_namespaces(client: TestClient) -> None:
    ks = keys_of([1, 2, 3, 4])
    sa = register(client, "a", tiers={"cpu": ks})
    register(client, "bb", tiers={"cpu": ks})
    register(client, "ccc", root="cd" * 16, tiers={"cpu": ks})  # same key bytes, other namespace
    holders = client.post("/v1/worker/locate", headers=AUTH, json={"session": sa, "keys": ks}).json()["holders"]
    assert holders == [[{"instance_id": "bb", "address": "127.0.0.1:1002"}]]
    resp = client.post("/move", headers=AUTH, json={"source": "a", "destination": "ccc"})
    assert resp.status_code == 409 and "cannot share" in resp.json()["detail"]


def test_operation_runs_through_a_polling_worker(client: TestClient) -> None:
    s = register(client, "a")

    def worker() -> None:  # a minimal agent: answer one command
        cmds = client.post("/v1/worker/poll", headers=AUTH, json={"session": s, "wait_s": 5}).json()["commands"]
        for cmd in cmds:
            client.post("/v1/worker/result", headers=AUTH, json={
                "session": s, "command_id": cmd["id"], "ok": True, "result": {"removed": 7, "kind": cmd["kind"]}})

    thread = threading.Thread(target=worker)
    thread.start()
    resp = client.post("/clear", headers=AUTH, json={"instance_id": "a", "wait_s": 5})
    thread.join()
    assert resp.status_code == 200
    assert resp.json()["status"] == "done" and resp.json()["result"] == {"removed": 7, "kind": "clear"}
    op = client.post("/check_finish", headers=AUTH, json={"op_id": resp.json()["op_id"]}).json()
    assert op["status"] == "done"


def test_unanswered_command_fails_the_operation_not_the_request(client: TestClient) -> None:
    register(client, "a")
    resp = client.post("/pin", headers=AUTH, json={"instance_id": "a", "token_ids": [1, 2], "wait_s": 0})
    assert resp.status_code == 202 and resp.json()["status"] in ("pending", "running")
    health = client.post("/health", headers=AUTH, json={"instance_id": "a", "timeout_s": 0.1}).json()
    assert health["status"] == "timeout"


def test_body_limit_and_unmatched_routes(client: TestClient) -> None:
    resp = client.post("/lookup", headers={**AUTH, "content-type": "application/json"},
                       content=b'{"model": "m", "token_ids": [' + b"1," * 40000 + b"1]}")
    assert resp.status_code == 413
    assert client.get("/nope", headers=AUTH).status_code == 404
    assert client.get("/nope").status_code == 401  # unknown routes are not public either
    assert client.get("/healthz").text == "ok"
