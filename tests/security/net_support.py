"""Helpers of the controller / router security tests: ``kvtier`` subcommands as real processes on
loopback, raw HTTP over a socket (to send what well-behaved clients never send), and a process's RSS."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from cluster_support import start_kvtier


@contextmanager
def kvtier_process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Run ``kvtier ARGS`` until it prints ``http://HOST:PORT``; yield (base URL, pid); stop it after."""
    child, url = start_kvtier(args, log, env)
    try:
        yield url, child.proc.pid
    finally:
        child.stop()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def raw_request(url: str, head: str) -> socket.socket:
    """A socket to ``url``'s host that has sent the request head ``head`` (no body yet)."""
    parts = httpx.URL(url)
    sock = socket.create_connection((parts.host, parts.port or 80), timeout=10)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
    return sock


def read_status(sock: socket.socket, timeout_s: float) -> int:
    """The status code of the response on ``sock`` (raises TimeoutError if none comes in ``timeout_s``)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before a status line: {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])
