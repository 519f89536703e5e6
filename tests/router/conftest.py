"""Fixtures of the router tests: a controller with two cluster workers (A, B) as the KV source and
fake OpenAI upstreams (see ``fake_openai``) as the engines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_openai import FakeFleet
from router_support import Cluster, WorkerProc, start_controller


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("router")
    fleet = FakeFleet(["A", "B", "P", "D"])
    controller = start_controller(logs)
    workers: dict[str, WorkerProc] = {}
    try:
        workers = {n: WorkerProc(n, controller.url, 64, logs) for n in ("A", "B")}
        for worker in workers.values():
            worker.wait_ready()
        yield Cluster(controller, workers, fleet, logs)
    finally:
        for worker in workers.values():
            worker.stop()
        controller.stop()
        fleet.stop()
