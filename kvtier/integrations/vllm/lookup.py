"""Scheduler → worker lookups when vLLM runs its worker in another process.

vLLM's OpenAI server on CPU always has three processes: API server, engine core (the scheduler and the
scheduler-side connector) and a worker (the model, the worker-side connector and kvtier's
CacheEngine). The scheduler asks the worker's engine how much of a request is cached over a Unix
socket: :class:`LookupServer` runs in the worker, :class:`LookupClient` in the scheduler.

Protocol (no pickle): request = the token ids as little-endian uint32 bytes; reply = 8 bytes, the hit
length as little-endian int64. Framing and the HMAC handshake (key = vLLM's KV engine id, known to both
processes) come from :mod:`multiprocessing.connection`, which with ``send_bytes``/``recv_bytes`` moves
raw bytes only. The socket lives in a per-user 0700 directory.

Failure: a client that cannot connect or gets no answer within ``timeout_s`` reports 0 (a miss) and
reconnects on a later call; the server never lets a client's error reach the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import numpy as np

from kvtier.keys import as_token_array

log = logging.getLogger(__name__)
_HIT = struct.Struct("<q")


def socket_path(engine_id: str, rank: int = 0) -> str:
    """Where the worker of ``rank`` listens; the same in every process of one vLLM instance."""
    folder = Path(tempfile.gettempdir()) / f"kvtier-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    safe = "".join(ch for ch in engine_id if ch.isalnum())[:24] or "default"
    return str(folder / f"lookup-{safe}-{rank}.sock")


class LookupServer:
    """Answers lookups with ``lookup(tokens) -> hit`` on a background thread per connection."""

    def __init__(self, path: str, lookup: Callable[[np.ndarray], int], authkey: bytes) -> None:
        self.path = path
        self._lookup = lookup
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a crashed worker
        self._listener = Listener(path, family="AF_UNIX", authkey=authkey)
        self._closed = False
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="kvtier-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception:
                if self._closed:
                    return
                log.debug("kvtier lookup: rejected a connection", exc_info=True)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kvtier-lookup-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
        with conn:
            while not self._closed:
                try:
                    data = conn.recv_bytes(1 << 26)
                except Exception:  # EOF, a reset, or close() pulled the handle from under us
                    return
                try:
                    hit = int(self._lookup(np.frombuffer(data, dtype="<u4")))
                except Exception:
                    log.exception("kvtier lookup failed in the worker; answering 0")
                    hit = 0
                try:
                    conn.send_bytes(_HIT.pack(hit))
                except Exception:
                    return

    def close(self) -> None:
        """Stop accepting, drop every open connection (clients see a miss), remove the socket."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        with contextlib.suppress(Exception):
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class LookupClient:
    """Thread-safe; one connection, opened on first use and again after any failure."""

    def __init__(self, path: str, authkey: bytes, timeout_s: float = 5.0) -> None:
        self.path = path
        self._authkey = authkey
        self.timeout_s = timeout_s
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.failures = 0

    def lookup(self, tokens: object) -> int:
        """Hit length the worker's engine reports for ``tokens``; 0 when it cannot be asked."""
        data = as_token_array(tokens).tobytes()  # type: ignore[arg-type]
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = Client(self.path, family="AF_UNIX", authkey=self._authkey)
                self._conn.send_bytes(data)
                if not self._conn.poll(self.timeout_s):
                    raise TimeoutError(f"no lookup answer within {self.timeout_s}s")
                (hit,) = _HIT.unpack(self._conn.recv_bytes(64))
                return int(hit)
            except Exception as exc:
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    log.warning("kvtier: cannot ask the worker for a lookup (%s); treating it as a miss", exc)
                self._drop()
                return 0

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()
