"""Real ``kvtier controller`` processes attacked as a client holding a worker's token (or no token)
would: instance-id hijack, admin routes, huge bodies before authentication, tokenizer paths chosen by
the client. ``shared`` is the deployment every existing setup has (one token for everyone); ``roles``
has separate admin, worker and read tokens and a small body cap."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from net_support import kvtier_process, peak_rss_bytes, raw_request, read_status

ADMIN, WORKER, READ = "admin-token-1", "worker-token-2", "read-token-3"
MODEL = "test-model"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tokenizer_file(where: Path) -> Path:
    """A tiny real tokenizer.json (word level) in ``where``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    where.mkdir(parents=True, exist_ok=True)
    tok.save(str(where / "tokenizer.json"))
    return where / "tokenizer.json"


def start(tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str],
          *options: str) -> Iterator[tuple[str, int]]:
    work = tmp_path_factory.mktemp(name)
    allowed = tokenizer_file(work / "allowed")
    args = ["controller", "--port", "0", "--heartbeat-ttl", "30", "--heartbeat", "1", "--tokenizer",
            f"{MODEL}={allowed}", "--log-level", "warning", *options]
    with kvtier_process(args, work / "controller.log", env) as running:
        yield running


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    yield from start(tmp_path_factory, "controller-shared", {"KVTIER_CONTROLLER_TOKEN": ADMIN})


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    env = {"KVTIER_CONTROLLER_TOKEN": ADMIN, "KVTIER_CONTROLLER_WORKER_TOKEN": WORKER,
           "KVTIER_CONTROLLER_READ_TOKEN": READ}
    yield from start(tmp_path_factory, "controller-roles", env, "--max-body-bytes", str(1 << 20))


def register(url: str, instance: str, token: str, model: str = MODEL, **extra: Any) -> httpx.Response:
    body = {"instance_id": instance, "model": model, "spec": "L2-H2-D8-float32-C4", "root": "ab" * 16,
            "chunk_tokens": 4, "p2p_address": "127.0.0.1:7001", **extra}
    return httpx.post(f"{url}/v1/worker/register", json=body, headers=auth(token), timeout=10)


def test_registration_hijack_is_refused(shared: tuple[str, int]) -> None:
    url, _pid = shared
    owner = register(url, "victim", ADMIN)
    assert owner.status_code == 200, owner.text
    # another holder of the (shared) token takes the live id over, pointing peers at its own address
    hijack = register(url, "victim", ADMIN, replace=True, p2p_address="127.0.0.1:6666")
    assert hijack.status_code == 403, hijack.text
    forged = register(url, "victim", ADMIN, replace=True, p2p_address="127.0.0.1:6666", secret="00" * 32)
    assert forged.status_code == 403, forged.text
    assert httpx.post(f"{url}/v1/worker/heartbeat", json={"session": owner.json()["session"]},
                      headers=auth(ADMIN), timeout=10).status_code == 200
    listed = httpx.get(f"{url}/instances", headers=auth(ADMIN), timeout=10).json()["instances"]
    assert [(i["instance_id"], i["p2p_address"]) for i in listed if i["instance_id"] == "victim"] == [
        ("victim", "127.0.0.1:7001")]
    # the owner itself may replace its session with the secret it was issued
    again = register(url, "victim", ADMIN, replace=True, secret=owner.json()["secret"])
    assert again.status_code == 200 and again.json()["session"] != owner.json()["session"]


def test_each_token_grants_only_its_role(roles: tuple[str, int]) -> None:
    url, _pid = roles
    assert register(url, "roles-a", WORKER).status_code == 200
    clear = {"instance_id": "roles-a", "tier": "cpu"}
    lookup = {"model": MODEL, "token_ids": [1, 2, 3, 4]}
    for token in (WORKER, READ):
        resp = httpx.post(f"{url}/clear", json=clear, headers=auth(token), timeout=10)
        assert resp.status_code == 403 and "admin" in resp.json()["detail"], resp.text
    assert httpx.post(f"{url}/clear", json=clear, headers=auth(ADMIN), timeout=10).status_code in (200, 202)
    assert httpx.post(f"{url}/lookup", json=lookup, headers=auth(WORKER), timeout=10).status_code == 403
    for token in (READ, ADMIN):
        assert httpx.post(f"{url}/lookup", json=lookup, headers=auth(token), timeout=10).status_code == 200
    # the read token cannot speak for a worker
    assert httpx.post(f"{url}/v1/worker/register", headers=auth(READ), timeout=10,
                      json={"instance_id": "x"}).status_code == 403
    assert httpx.get(f"{url}/instances", timeout=10).status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # public


SIZE = 62_000_000


def blast(url: str, head: str, chunked: bool) -> int:
    """Send ``head`` and up to :data:`SIZE` body bytes (chunked or not) until answered; the status."""
    chunk = b"a" * (1 << 20)
    with raw_request(url, head) as s:
        status: list[int] = []
        reader = threading.Thread(target=lambda: status.append(read_status(s, 30.0)))
        reader.start()
        sent = 0
        try:
            while sent < SIZE and not status:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
                sent += len(chunk)
        except OSError:
            pass  # the controller answered and closed: what we want
        reader.join(30)
        return status[0] if status else 0


def test_huge_body_with_a_bad_token_is_refused_before_it_is_read(shared: tuple[str, int]) -> None:
    url, pid = shared
    before = peak_rss_bytes(pid)
    sock = raw_request(url, f"POST /v1/worker/register HTTP/1.1\nHost: x\nAuthorization: Bearer wrong\n"
                            f"Content-Type: application/json\nContent-Length: {SIZE}\n")
    with sock:
        assert read_status(sock, 5.0) == 403  # answered from the headers: no body byte was sent
    # the body actually sent, with a bad token and with none
    statuses = [blast(url, f"POST /lookup HTTP/1.1\nHost: x\nContent-Length: {SIZE}\n", False),
                blast(url, f"POST /clear HTTP/1.1\nHost: x\nAuthorization: Bearer wrong\nContent-Length: {SIZE}\n",
                      False)]
    assert statuses == [401, 403]
    grown = peak_rss_bytes(pid) - before
    assert grown < 20 << 20, f"controller peak RSS grew by {grown >> 20} MiB for bodies it refused"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_chunked_body_past_the_cap_is_cut_off(roles: tuple[str, int]) -> None:
    url, pid = roles
    before = peak_rss_bytes(pid)

    head = f"POST /v1/worker/events HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\nAuthorization: Bearer {WORKER}\n"
    assert blast(url, head, True) == 413
    grown = peak_rss_bytes(pid) - before
    assert grown < 20 << 20, f"controller peak RSS grew by {grown >> 20} MiB for bodies it refused"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_tokenizer_only_from_the_operators_allow_list(shared: tuple[str, int], tmp_path: Path) -> None:
    url, _pid = shared
    # a client registers a model "name" that is a path to a tokenizer it planted
    planted = tokenizer_file(tmp_path / "planted").parent
    assert register(url, "planter", ADMIN, model=str(planted)).status_code == 200
    resp = httpx.post(f"{url}/lookup", json={"model": str(planted), "text": "hello world"}, headers=auth(ADMIN),
                      timeout=30)
    assert resp.status_code == 422 and "no tokenizer is configured" in resp.json()["detail"], resp.text
    # the operator's tokenizer for the allowed model works
    assert register(url, "allowed", ADMIN).status_code == 200
    ok = httpx.post(f"{url}/lookup", json={"model": MODEL, "text": "hello world"}, headers=auth(ADMIN), timeout=30)
    assert ok.status_code == 200 and ok.json()["num_tokens"] == 2, ok.text


def test_settings_refuse_shared_or_orphan_tokens() -> None:
    from kvtier.config import ControllerConfig
    from kvtier.errors import ConfigError

    with pytest.raises(ConfigError, match="must differ"):
        ControllerConfig(token="same", worker_token="same").check()
    with pytest.raises(ConfigError, match="no admin token"):
        ControllerConfig(worker_token="w").check()
    ControllerConfig(token="a", worker_token="w", read_token="r").check()


def test_openapi_document_stays_public(roles: tuple[str, int]) -> None:
    url, _pid = roles
    doc = json.loads(httpx.get(f"{url}/openapi.json", timeout=10).text)
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
