"""Mooncake Store tier: kvtier frames as objects of a Mooncake distributed store.

Mooncake (PyPI ``mooncake-transfer-engine-non-cuda``) is a ``mooncake_master`` holding object metadata
plus memory segments contributed by its clients; every kvtier process using this tier is such a client
(``segment`` bytes of its memory join the pool) and reads objects from whichever client holds them,
over TCP here (RDMA where available). Objects live as long as the client that holds them and the
master's view of them: a restarted master starts empty (misses), a client that exits takes its segment
along.

Contract (see :mod:`kvtier.storage.base`): keys are ``key_prefix + key.hex()``; a ``put`` stores the
whole frame (Mooncake's put is all-or-nothing; an existing key keeps its object, which is the same
content under content-derived keys); ``get`` returns the stored frame or ``None``; batched ``exists``
is one ``batch_is_exist`` round trip. A failed RPC (master down) raises
:class:`~kvtier.errors.TierUnavailable` at once: the manager turns it into a miss and backs off;
Mooncake's client fails such calls in under 1 ms and reconnects by itself once the master is back.
Connecting is different: Mooncake's ``setup`` against a dead master blocks for about 90 s *holding the
GIL* (the whole process stalls), so the tier first checks with a plain TCP connect (0.5 s timeout) that
the master's RPC port and the HTTP metadata server accept connections, and only then calls ``setup``,
on a background thread (at construction, and again at most every ``RETRY_S`` after a failure, one at
a time); every call before it succeeds is a fast miss. Frames are verified by the manager; a frame larger than
``max_frame_bytes`` is a miss; a put the store refuses (full) is dropped and counted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kvtier.errors import TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.storage.base import Tier

if TYPE_CHECKING:
    from kvtier.config import MooncakeConfig

log = logging.getLogger(__name__)


RETRY_S = 1.0  # least time between two connection attempts


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _endpoints(master: str, metadata_server: str) -> list[tuple[str, int]]:
    """(host, port) pairs that must accept TCP connections before ``setup`` may be called."""
    host, _, port = master.rpartition(":")
    out = [(host.strip("[]") or "127.0.0.1", int(port))]
    url = urlsplit(metadata_server)
    if url.scheme in ("http", "https") and url.hostname:
        out.append((url.hostname, url.port or (443 if url.scheme == "https" else 80)))
    return out


def _unreachable(code: int) -> bool:
    """Mooncake's RPC / transport error codes (-900 RPC_FAIL and its neighbours): the master or a peer
    cannot be reached."""
    return -999 <= code <= -900


class MooncakeTier(Tier):
    name = "mooncake"

    def __init__(self, master: str, metadata_server: str, *, local_hostname: str = "127.0.0.1",
                 protocol: str = "tcp", device: str = "", segment: int = 1 << 30, buffer: int = 256 << 20,
                 key_prefix: str = "kvtier:", max_frame_bytes: int = 256 << 20) -> None:
        self.master = master
        self.metadata_server = metadata_server
        self.local_hostname = local_hostname
        self.protocol = protocol
        self.device = device
        self.segment = segment
        self.buffer = buffer
        self.prefix = key_prefix
        self.max_frame_bytes = max_frame_bytes
        self._store: Any = None
        self._lock = threading.Lock()
        self._connecting: threading.Thread | None = None
        self._last_attempt = float("-inf")
        self._closed = False
        self.counters: dict[str, int] = {"setups": 0, "setup_failures": 0, "too_large": 0, "puts_refused": 0}
        self._connect()

    @classmethod
    def from_config(cls, c: MooncakeConfig) -> MooncakeTier:
        return cls(c.master, c.metadata_server, local_hostname=c.local_hostname, protocol=c.protocol,
                   device=c.device, segment=c.segment, buffer=c.buffer, key_prefix=c.key_prefix,
                   max_frame_bytes=c.max_frame_bytes)

    def _connect(self) -> None:
        """Start the background setup unless connected, connecting or closed."""
        with self._lock:
            if self._store is not None or self._closed or (self._connecting and self._connecting.is_alive()):
                return
            if time.monotonic() - self._last_attempt < RETRY_S:
                return
            self._last_attempt = time.monotonic()
            self._connecting = threading.Thread(target=self._setup, name="kvtier-mooncake-setup", daemon=True)
            self._connecting.start()

    def _setup(self) -> None:
        down = [f"{h}:{p}" for h, p in _endpoints(self.master, self.metadata_server) if not _accepts(h, p)]
        if down:
            with self._lock:
                self.counters["setup_failures"] += 1
            log.debug("Mooncake master / metadata server %s not reachable; misses until it is", down)
            return
        try:
            from mooncake.store import MooncakeDistributedStore

            client = MooncakeDistributedStore()
            rc = client.setup(self.local_hostname, self.metadata_server, self.segment, self.buffer,
                              self.protocol, self.device, self.master)
        except Exception:
            log.exception("Mooncake client setup failed (is mooncake-transfer-engine-non-cuda installed?)")
            rc, client = -1, None
        with self._lock:
            if rc != 0 or client is None:
                self.counters["setup_failures"] += 1
                log.warning("Mooncake setup against master %s failed (code %s); misses until it succeeds",
                            self.master, rc)
                return
            if self._closed:
                client.close()
                return
            self.counters["setups"] += 1
            self._store = client
        log.info("Mooncake tier connected to master %s (segment %d bytes)", self.master, self.segment)

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until connected (at most ``timeout_s``; tests and benchmarks); True if connected."""
        deadline = time.monotonic() + timeout_s
        while self._store is None and time.monotonic() < deadline:
            self._connect()
            thread = self._connecting
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
            if self._store is None:
                time.sleep(0.05)
        return self._store is not None

    def _client(self) -> Any:
        """The connected store client; a fast :class:`TierUnavailable` while (re)connecting."""
        store = self._store
        if store is None:
            self._connect()
            raise TierUnavailable(f"Mooncake master {self.master} not connected yet")
        return store

    def _check(self, code: int, what: str) -> None:
        if _unreachable(code):
            raise TierUnavailable(f"Mooncake {what} failed (code {code}): master {self.master} unreachable")

    def _key(self, key: ChunkKey) -> str:
        return self.prefix + key.hex()

    def put(self, key: ChunkKey, frame: bytes) -> None:
        self.put_parts(key, (frame,))

    def put_parts(self, key: ChunkKey, parts: Sequence[bytes | memoryview]) -> None:
        rc = self._client().put_parts(self._key(key), *parts)
        self._check(rc, "put")
        if rc != 0:
            self.counters["puts_refused"] += 1
            log.debug("Mooncake refused put of %s (code %d)", key.hex(), rc)

    def get(self, key: ChunkKey) -> bytes | None:
        client = self._client()
        name = self._key(key)
        size = client.get_size(name)
        self._check(size, "get")
        if size < 0:
            return None
        if size > self.max_frame_bytes:
            self.counters["too_large"] += 1
            return None
        data = client.get(name)
        return bytes(data) if data else None  # removed (evicted) between the two calls: a miss

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        found = self._client().batch_is_exist([self._key(k) for k in keys])
        for code in found:
            self._check(code, "exists")
        return [code == 1 for code in found]

    def delete(self, key: ChunkKey) -> bool:
        rc = self._client().remove(self._key(key))
        self._check(rc, "remove")
        return rc == 0  # not found, or leased by a reader right now: not removed

    def clear(self) -> int:
        """Remove every object of the store (Mooncake has no listing by prefix): use a store per
        kvtier deployment."""
        rc = self._client().remove_all()
        self._check(rc, "remove_all")
        return max(int(rc), 0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def stats(self) -> dict[str, int | float]:
        return dict(self.counters)
