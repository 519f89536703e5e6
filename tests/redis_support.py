"""Test helper: real ``redis-server`` processes on private loopback ports, and a 3-master Redis Cluster.

Every server binds 127.0.0.1 only, runs in its own temporary directory, keeps nothing on disk (no RDB,
no AOF) and is stopped when its owner exits (an ``atexit`` hook catches the ones a failed test left).
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import redis

CLUSTER_SLOTS = 16384
_live: weakref.WeakSet[RedisServer] = weakref.WeakSet()


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` (or ``valkey-server``), or None when neither is installed."""
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port nobody listens on (and, for cluster nodes, port + 10000 too)."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        if _port_free(port) and (not with_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


class RedisServer:
    """One ``redis-server`` process; ``kill()`` + ``start()`` restarts it on the same port and dir."""

    def __init__(
        self, port: int | None = None, *, cluster: bool = False, extra: tuple[str, ...] = ()
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.cluster = cluster
        self.port = port or free_port(with_bus=cluster)
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvtier-redis-{self.port}-"))
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        _live.add(self)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]
        self.proc = subprocess.Popen([*args, *self.extra], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        with contextlib.closing(self.client(socket_connect_timeout=0.2)) as probe:
            while True:
                if self.proc.poll() is not None:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server on port {self.port} exited: {log}")
                try:
                    if probe.ping():
                        return self
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout_s}s")
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (a crash) and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterProcs:
    """Three ``redis-server`` masters joined into one cluster (no replicas), slots split evenly.

    Nodes use ``cluster-require-full-coverage no`` and a 1 s node timeout, so when one master dies the
    other two keep serving their slots.
    """

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> RedisClusterProcs:
        for node in self.nodes:
            node.start()
        per = CLUSTER_SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            lo = i * per
            hi = CLUSTER_SLOTS - 1 if i == len(self.nodes) - 1 else lo + per - 1
            with contextlib.closing(node.client()) as c:
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
        with contextlib.closing(self.nodes[0].client()) as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        self.wait_ok(timeout_s)
        return self

    def wait_ok(self, timeout_s: float = 30.0, nodes: list[RedisServer] | None = None) -> None:
        """Wait until every (live) node reports ``cluster_state:ok`` and knows all masters."""
        deadline = time.monotonic() + timeout_s
        for node in nodes or self.nodes:
            with contextlib.closing(node.client()) as c:
                while True:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    known = sum(1 for line in c.execute_command("CLUSTER", "NODES").decode().splitlines()
                                if "master" in line and "fail" not in line)
                    if "cluster_state:ok" in text and known == len(self.nodes):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster not ok after {timeout_s}s: {text}")
                    time.sleep(0.05)

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start a killed node again on its port; it rejoins from its nodes.conf with its slots."""
        self.nodes[index].start()
        self.wait_ok(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


__all__ = ["RedisClusterProcs", "RedisServer", "free_port", "redis_server_binary"]
