"""A real ``kvtier router`` process in front of the fake OpenAI upstreams of ``tests/router``: what one
client or one backend does must not reach another client, backend credentials never leave the
router, and hostile JSON is a 400, not a 500."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from net_support import kvtier_process

sys.path.insert(0, str(Path(__file__).parents[1] / "router"))
from fake_openai import FakeFleet

BODY = {"model": "fake", "prompt": "hello", "max_tokens": 2}
SECRET = "s3cr3t-pw"


@pytest.fixture(scope="module")
def fleet() -> Iterator[FakeFleet]:
    upstreams = FakeFleet(["A"])
    yield upstreams
    upstreams.stop()


@pytest.fixture(scope="module")
def router(fleet: FakeFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("router-isolation") / "router.log"
    with kvtier_process(["router", "--port", "0", "--policy", "least_loaded", "--backend", fleet.url("A")], log) \
            as (url, _pid):
        yield url


def dead_url_with_credentials() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://admin:{SECRET}@127.0.0.1:{s.getsockname()[1]}"


def test_a_backend_cookie_for_one_client_never_reaches_another(fleet: FakeFleet, router: str) -> None:
    first = httpx.post(f"{router}/v1/completions", json=BODY, timeout=10)
    assert first.status_code == 200
    assert "set-cookie" not in first.headers  # not relayed either: the router holds no session state
    direct = httpx.post(f"{fleet.url('A')}/v1/completions", json=BODY, timeout=10)
    assert "set-cookie" in direct.headers  # the backend does set one
    with httpx.Client() as other_client:
        assert other_client.post(f"{router}/v1/completions", json=BODY, timeout=10).status_code == 200
    assert all("cookie" not in headers for headers in fleet["A"].headers), fleet["A"].headers


def test_nested_or_malformed_json_is_a_400(router: str) -> None:
    for body in (b"[" * 100_000, b'{"a":' * 50_000, b"{", b"\xff\xfe", b'"just a string"'):
        resp = httpx.post(f"{router}/v1/completions", content=body, timeout=10,
                          headers={"content-type": "application/json"})
        assert resp.status_code == 400, (body[:20], resp.status_code, resp.text[:200])
        assert "Traceback" not in resp.text
    assert httpx.post(f"{router}/v1/completions", json=BODY, timeout=10).status_code == 200  # still serving


def test_backend_credentials_never_leave_the_router(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    with kvtier_process(["router", "--port", "0", "--policy", "least_loaded", "--log-level", "info",
                         "--backend", dead_url_with_credentials()], log) as (url, _pid):
        failed = httpx.post(f"{url}/v1/completions", json=BODY, timeout=30)
        assert failed.status_code == 502, failed.text
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "backend failed" in failed.text and "127.0.0.1" in failed.text  # still says which one
    for where, text in (("502 body", failed.text), ("headers", str(failed.headers)), ("metrics", metrics),
                        ("log", log.read_text())):
        assert SECRET not in text and "admin:" not in text, f"credentials in the {where}: {text[:500]}"


def test_backend_header_is_opt_in_and_opaque(fleet: FakeFleet, router: str, tmp_path: Path) -> None:
    assert "x-kvtier-backend" not in httpx.post(f"{router}/v1/completions", json=BODY, timeout=10).headers
    with kvtier_process(["router", "--port", "0", "--policy", "least_loaded", "--backend-header",
                         "--backend", fleet.url("A")], tmp_path / "router.log") as (url, _pid):
        named = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
    assert named.headers["x-kvtier-backend"] == "decode-0"
