"""Schemathesis against the published OpenAPI document of a live controller: no request, valid or not,
gets a 5xx. A registered instance makes instance-scoped routes reach their real code paths (its
commands time out quickly, which must fail the operation, not the request)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from cluster_support import ThreadedController
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from kvtier.cluster.controller import create_app
from kvtier.config import ControllerConfig

TOKEN = "fuzz"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def controller_url() -> Iterator[str]:
    ctl = ThreadedController(ControllerConfig(token=TOKEN, ttl_s=600, heartbeat_s=1, command_timeout_s=0.02))
    url = ctl.start()
    resp = httpx.post(f"{url}/v1/worker/register", headers=AUTH, json={
        "instance_id": "inst-1", "model": "m", "spec": "s", "root": "00" * 16, "chunk_tokens": 4,
        "codecs": ["raw"], "p2p_address": "127.0.0.1:9", "tiers": {"cpu": ["11" * 16]}})
    assert resp.status_code == 200, resp.text
    yield url
    ctl.stop()


OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(
    create_app(ControllerConfig()).openapi()).get_all_operations() if isinstance(result, Ok)]
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors(controller_url: str, operation: Any, mode: GenerationMode) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=controller_url, headers=AUTH, timeout=40)
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        pytest.skip(f"{operation.label} takes no input that could be invalid")


def test_openapi_lists_every_route(controller_url: str) -> None:
    doc = httpx.get(f"{controller_url}/openapi.json").json()
    for route in ("/lookup", "/clear", "/pin", "/unpin", "/move", "/compress", "/check_finish", "/health",
                  "/instances", "/metrics", "/v1/worker/register", "/v1/worker/poll"):
        assert route in doc["paths"], route
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
