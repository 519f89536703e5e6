"""Helpers of the cluster tests: real processes on loopback (a ``kvtier controller`` and
worker processes running ``worker_proc.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kvtier.procs import Child

TOKEN = "cluster-test-token"
MODEL = "test-model"
CHUNK = 16
TTL_S = 1.5
WORKER = Path(__file__).with_name("worker_proc.py")
TOKENIZER = Path("~/.cache/kvtier/models/smollm2-135m-instruct-bf16/tokenizer.json").expanduser()


def tokens(seed: int, n: int) -> list[int]:
    return np.random.RandomState(seed).randint(0, 50_000, size=n).tolist()


class WorkerProc:
    """A worker process driven over stdin/stdout JSON lines (its logging goes to ``<name>.log``)."""

    def __init__(self, name: str, url: str, chunks: int, log_dir: Path, disk: Path | None = None) -> None:
        self.name = name
        args = [sys.executable, str(WORKER), url, name, TOKEN, str(chunks)] + ([str(disk)] if disk else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.child = Child(args, log=log_dir / f"{name}.log", env=env, stdin=True)
        self.proc = self.child.proc
        self.info: dict[str, Any] = {}

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.child.expect(r"^\{", timeout_s).string)
        return out

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        self.info = self._reply(timeout_s)
        assert self.info["ready"], f"worker {self.name} did not register"

    def call(self, op: str, toks: list[int] | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
        self.child.send(json.dumps({"op": op, "tokens": toks or []}))
        return self._reply(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """End the worker's input (it exits); stop it if it has not within 15 s."""
        self.child.close_stdin()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        self.child.stop()


def start_kvtier(args: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[Child, str]:
    """``kvtier ARGS`` (a subcommand that prints ``http://HOST:PORT`` when ready): the child and its
    loopback URL; raises with the log when it does not start within 120 s."""
    child = Child([sys.executable, "-m", "kvtier.cli", *args], log=log, env={**os.environ, **(env or {})})
    try:
        port = child.expect(r"http://[^:\s]+:(\d+)", 120).group(1)
    except BaseException:
        child.stop()
        raise
    return child, f"http://127.0.0.1:{port}"


class Cluster:
    def __init__(self, url: str, workers: dict[str, WorkerProc]) -> None:
        self.url = url
        self.workers = workers
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30.0)

    def __getitem__(self, name: str) -> WorkerProc:
        return self.workers[name]

    def lookup(self, toks: list[int]) -> dict[str, int]:
        resp = self.http.post("/lookup", json={"model": MODEL, "token_ids": toks})
        assert resp.status_code == 200, resp.text
        return {inst: hit["hit_tokens"] for inst, hit in resp.json()["instances"].items()}

    def op(self, route: str, **body: Any) -> dict[str, Any]:
        """Run an operation and wait for it (asserting the HTTP status is 200)."""
        body.setdefault("wait_s", 10.0)
        resp = self.http.post(route, json=body)
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()
        return out


def wait_until(check: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> float:
    """Poll ``check`` until true; return the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    cmd = ["controller", "--port", "0", "--heartbeat-ttl", str(TTL_S),
           "--heartbeat", "0.25", "--command-timeout", "10", "--log-level", "warning"]
    if TOKENIZER.is_file():
        cmd += ["--tokenizer", f"{MODEL}={TOKENIZER}"]
    controller, url = start_kvtier(cmd, logs / "controller.log", {"KVTIER_CONTROLLER_TOKEN": TOKEN})
    workers: dict[str, WorkerProc] = {}
    try:
        workers = {"A": WorkerProc("A", url, 32, logs), "B": WorkerProc("B", url, 32, logs),
                   "C": WorkerProc("C", url, 32, logs, disk=logs / "disk-C")}
        for worker in workers.values():
            worker.wait_ready()
        yield Cluster(url, workers)
    finally:
        for worker in workers.values():
            worker.stop()
        controller.stop(10)


class ThreadedController:
    """A controller served by uvicorn on a thread of the test process (for in-process tests)."""

    def __init__(self, settings: Any) -> None:
        from kvtier.cluster.controller import create_app

        self.app = create_app(settings)
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.port = 0

    def start(self, port: int = 0) -> str:
        import uvicorn

        from kvtier.cluster.controller import bind

        sock = bind("127.0.0.1", port)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: bool(self.server.started), 20, "controller started")
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
