"""Peer-to-peer chunk transfer: serve this engine's CPU chunks to peers, fetch missing chunks from them.

Both directions use the cache server's ``KVS1`` protocol (:mod:`kvtier.storage.remote_protocol`) carrying
:mod:`kvtier.wire` frames: the serving side is a :class:`~kvtier.server.app.CacheServer` over a
read-only view of the CPU tier, the fetching side is one :class:`~kvtier.storage.remote.RemoteTier`
per peer (pooled persistent connections, timeouts, token HELLO). No second protocol.

:class:`PeerTier` is a :class:`~kvtier.storage.base.Tier`, placed last among an engine's lower tiers,
so the :class:`~kvtier.storage.manager.StorageManager` applies its usual guarantees to peer data: a
fetched frame is used only after its checksum, key, KV spec, parent key and token ids were verified,
and it is then admitted into the local CPU tier (a second request does not touch the network).

Invariants:
- The peer tier is read-only (``read_only = True``: write-back skips it; put/delete/clear do nothing)
  and the peer server answers HELLO, PING, GET, MGET and EXISTS only (:data:`PEER_OPS`; LIST, STATS,
  PUT, DELETE and CLEAR get FORBIDDEN): peers can fetch chunks whose key they know, nothing else.
- The peer server requires the agent's token whenever the agent has one (the agent needs one exactly
  when the controller requires one) and refuses a non-loopback address without it.
- The fetching side caps every reply by its own ``max_frame_bytes``, never by what a peer announces:
  a peer that streams more is a counted miss (``peer_failures``) with bounded memory.
- ``exists`` asks the controller who holds the keys (raising :class:`TierUnavailable` only when the
  controller cannot be reached, so the manager backs off); ``get`` tries the holders in turn and a
  dead or misbehaving peer is a miss, never an exception (the engine then recomputes), and is skipped
  for :data:`PEER_COOLDOWN_S` so the next tries do not wait on it again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from kvtier import frames
from kvtier.config import ServerConfig
from kvtier.errors import ConfigError, KvtierError, TierUnavailable
from kvtier.frame_auth import FrameKeys
from kvtier.keys import ChunkKey
from kvtier.net import is_loopback
from kvtier.server.app import CacheServer
from kvtier.server.store import ChunkStore, Frame
from kvtier.storage import remote_protocol as P
from kvtier.storage.base import Tier
from kvtier.storage.cpu import CpuTier
from kvtier.storage.remote import RemoteTier

log = logging.getLogger(__name__)

# keys -> per key, the ``host:port`` addresses of peers holding it (raises TierUnavailable)
Locator = Callable[[list[ChunkKey]], list[list[str]]]
PEER_OPS = frozenset({P.Op.GET, P.Op.MGET, P.Op.EXISTS})
MAX_FRAME_BYTES = 256 << 20  # default cap of a frame fetched from a peer
PEER_COOLDOWN_S = 1.0  # a peer that failed a fetch is skipped this long


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"peer address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def frame_of(cpu: CpuTier, key: ChunkKey, auth: FrameKeys | None = None) -> bytes | None:
    """The wire frame (raw codec, MAC'd with ``auth``'s current key when given) of CPU chunk ``key``,
    or None if the tier does not hold it."""
    got = cpu.acquire_key(key)
    if got is None:
        return None
    slot, record = got
    try:
        return frames.pack(record, cpu.arena.view(slot, record.num_tokens), cpu.spec, "raw", auth)
    finally:
        cpu.release(slot)


class EngineChunkStore(ChunkStore):
    """The cache server's store interface over an engine's CPU tier, read-only."""

    def __init__(self, cpu: CpuTier, auth: FrameKeys | None = None) -> None:
        super().__init__(capacity_bytes=cpu.arena.capacity_bytes)
        self.cpu = cpu
        self.auth = auth

    async def put(self, tenant: str, key: bytes, frame: Frame) -> str:
        self.counters["puts_refused"] += 1
        raise KvtierError("this is a read-only kvtier peer: chunks are fetched from it, never pushed")

    async def get(self, tenant: str, key: bytes) -> Frame | None:
        frame = await asyncio.to_thread(frame_of, self.cpu, key, self.auth)
        self.counters["served" if frame is not None else "misses"] += 1
        if frame is not None:
            self.counters["bytes_served"] += len(frame)
        return frame

    def exists(self, tenant: str, keys: Sequence[bytes]) -> list[bool]:
        out = []
        for key in keys:
            got = self.cpu.acquire_key(key)
            if got is not None:
                self.cpu.release(got[0])
            out.append(got is not None)
        return out

    async def delete(self, tenant: str, keys: Sequence[bytes]) -> list[bool]:
        return [False] * len(keys)

    async def clear(self) -> int:
        return 0

    def sorted_keys(self, tenant: str) -> list[bytes]:
        return sorted(self.cpu.keys())

    def stats(self) -> dict[str, int | float]:
        return {**self.counters, "chunks_memory": len(self.cpu), "capacity_bytes": self.cpu.arena.capacity_bytes}

    def close(self) -> None:
        """Nothing to close: the CPU tier belongs to the engine."""


class PeerServer:
    """A :class:`CacheServer` over :class:`EngineChunkStore`, on its own event-loop thread."""

    def __init__(self, cpu: CpuTier, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 max_connections: int = 64, auth: FrameKeys | None = None) -> None:
        if not token and not is_loopback(host):
            raise ConfigError(f"the P2P server would listen on {host!r}, which is not loopback, without a "
                              "token; set the agent's token or bind 127.0.0.1")
        self.store = EngineChunkStore(cpu, auth)
        self.config = ServerConfig(host=host, port=port, token=token, max_connections=max_connections,
                                   capacity=cpu.arena.capacity_bytes, shutdown_grace_s=1.0)
        self.port = 0
        self._server: CacheServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> int:
        """Listen; return the port."""
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name="kvtier-p2p-server",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise ConfigError(f"the P2P server did not start within {timeout_s}s")
        if self._error is not None:
            raise ConfigError(f"cannot start the P2P server on {self.config.host}:{self.config.port}: "
                              f"{self._error}") from self._error
        return self.port

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self._server = CacheServer(self.config, store=self.store, ops=PEER_OPS)
            self.port = await self._server.start()
        except Exception as exc:
            self._error = exc
            ready.set()
            return
        ready.set()
        await self._stop.wait()
        await self._server.shutdown(grace_s=1.0)

    def stats(self) -> dict[str, int | float]:
        return self._server.stats() if self._server is not None else {}

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


class PeerTier(Tier):
    """Fetches chunks other instances hold; see the module docstring. Thread-safe."""

    name = "p2p"
    read_only = True

    def __init__(self, locate: Locator, token: str = "", timeout_s: float = 1.0, *, holder_ttl_s: float = 5.0,
                 max_peers: int = 32, max_cached_keys: int = 65536, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._locate = locate
        self.max_frame_bytes = max_frame_bytes
        self.token = token
        self.timeout_s = timeout_s
        self.holder_ttl_s = holder_ttl_s
        self.max_peers = max_peers
        self.max_cached_keys = max_cached_keys
        self._holders: OrderedDict[ChunkKey, tuple[float, list[str]]] = OrderedDict()
        self._peers: OrderedDict[str, RemoteTier] = OrderedDict()
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def client(self, address: str) -> RemoteTier:
        """The pooled client of peer ``address`` (at most ``max_peers`` kept; the oldest is closed)."""
        with self._lock:
            peer = self._peers.get(address)
            if peer is not None:
                self._peers.move_to_end(address)
                return peer
            host, port = split_address(address)
            peer = RemoteTier(host, port, self.token, self.timeout_s, pool_size=2, retries=0,
                              max_reply_bytes=self.max_frame_bytes)
            self._peers[address] = peer
            while len(self._peers) > self.max_peers:
                old_address, old = self._peers.popitem(last=False)
                self._down_until.pop(old_address, None)
                old.close()
            return peer

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        holders = self._locate(list(keys))
        deadline = time.monotonic() + self.holder_ttl_s
        with self._lock:
            for key, where in zip(keys, holders):
                if where:
                    self._holders[key] = (deadline, where)
                    self._holders.move_to_end(key)
            while len(self._holders) > self.max_cached_keys:
                self._holders.popitem(last=False)
            self.counters["locates"] += 1
        return [bool(where) for where in holders]

    def _holders_of(self, key: ChunkKey) -> list[str]:
        with self._lock:
            cached = self._holders.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return self._locate([key])[0]

    def get(self, key: ChunkKey) -> bytes | None:
        for address in self._holders_of(key):
            if self._down_until.get(address, 0.0) > time.monotonic():
                self._count("peer_skipped")
                continue
            try:
                frame = self.client(address).get(key)
            except TierUnavailable as exc:
                self._count("peer_failures")
                with self._lock:
                    self._down_until[address] = time.monotonic() + PEER_COOLDOWN_S
                log.debug("peer %s failed to serve %s: %s", address, key.hex(), exc)
                continue
            if frame is not None:
                self._count("fetched")
                self._count("bytes_fetched", len(frame))
                return frame
            self._count("peer_stale")  # the index was stale: the peer evicted it meanwhile
        self._count("fetch_misses")
        return None

    def put(self, key: ChunkKey, frame: bytes) -> None:
        """Read-only tier: nothing is written to peers."""

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            self._holders.pop(key, None)
        return False

    def clear(self) -> int:
        with self._lock:
            self._holders.clear()
        return 0

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = dict(self.counters)
            out["peers"] = len(self._peers)
        return out

    def close(self) -> None:
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for peer in peers:
            peer.close()
