"""Helpers of the router tests: real ``kvtier router`` and ``kvtier controller`` processes and cluster
workers (``tests/cluster/worker_proc.py``) on loopback, plus the fake upstreams of ``fake_openai``."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fake_openai import FakeFleet

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from cluster_support import CHUNK, MODEL, TOKEN, TOKENIZER, WorkerProc, start_kvtier, tokens, wait_until

__all__ = [
    "CHUNK",
    "MODEL",
    "TOKEN",
    "TOKENIZER",
    "Cluster",
    "Proc",
    "WorkerProc",
    "dead_url",
    "metric",
    "sse_events",
    "start_controller",
    "start_router",
    "tokens",
    "wait_until",
]


class Proc:
    """A started ``kvtier`` subcommand that printed ``http://HOST:PORT`` when ready."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.child, self.url = start_kvtier(args, log, env)
        self.proc = self.child.proc
        self.http = httpx.Client(base_url=self.url, timeout=30.0, headers=headers)

    def stop(self) -> None:
        self.http.close()
        self.child.stop(10)


@dataclass
class Cluster:
    """The router tests' shared setup (the `cluster` fixture): controller, workers A and B, fake upstreams."""

    controller: Proc
    workers: dict[str, WorkerProc]
    fleet: FakeFleet
    logs: Path

    def backend(self, name: str) -> str:
        """``--backend`` value mapping fake upstream ``name`` to controller instance ``name``."""
        return f"{self.fleet.url(name)}={name}"


def start_controller(log_dir: Path) -> Proc:
    return Proc(["controller", "--port", "0", "--heartbeat-ttl", "3", "--heartbeat", "0.25"],
                log_dir / "controller.log", env={"KVTIER_CONTROLLER_TOKEN": TOKEN})


def start_router(log_dir: Path, name: str, *args: str, env: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> Proc:
    return Proc(["router", "--port", "0", "--log-level", "warning", *args], log_dir / f"router-{name}.log",
                env={"KVTIER_CONTROLLER_TOKEN": TOKEN, **(env or {})}, headers=headers)


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def sse_events(raw: str) -> list[dict[str, Any]]:
    import json

    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
