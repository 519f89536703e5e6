"""Redis / Valkey tier: wire frames as plain string values, one Redis key per chunk.

Invariants beyond the :class:`~kvtier.storage.base.Tier` contract:

- The Redis key of a chunk is ``key_prefix + key.hex()`` (ASCII). No hash tag is added, so in cluster
  mode chunks spread over all slots and masters; ``clear`` removes only keys under ``key_prefix``.
- A frame is written with one ``SET`` (with ``EX`` when ``ttl_s > 0``), which Redis applies atomically:
  a reader sees the old value, nothing, or the whole new frame. A connection that breaks mid-send
  leaves an incomplete command the server never executes.
- Every failure of the client (refused connection, timeout, cluster down, a server error such as OOM,
  a client construction that cannot reach any node) surfaces as
  :class:`~kvtier.errors.TierUnavailable` and nothing else. The client retries once immediately (so a
  pooled connection that a server restart broke is replaced transparently) and never sleeps between
  retries: a dead server costs one refused connect per call, the manager does the backing off.
- ``exists`` is one pipelined round trip per node (redis-py's cluster pipeline groups keys by node). A
  node that cannot be reached fails the whole call: a chunk prefix almost always spans every master, so
  answering for the live ones would rarely save a lookup.
- Payload bytes are not copied here: ``get`` returns redis-py's reply object, ``put`` hands the frame
  over as is, and ``put_parts`` / ``put_many`` write header and payload views to the socket one after
  the other (joining them only when falling back to ``put`` after a broken connection or a redirect).
- Batches: ``get_many`` is one ``MGET`` (cluster: one per hash slot, ``mget_nonatomic``); ``put_many``
  pipelines its ``SET`` commands, one connection per node, all sent before any reply is read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError
from redis.retry import Retry

from kvtier.config import RedisConfig
from kvtier.errors import ConfigError, TierUnavailable
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.storage.base import Tier

log = logging.getLogger(__name__)

Mode = Literal["single", "cluster", "sentinel"]
T = TypeVar("T")

#: Everything redis-py raises when a server is unreachable, slow or refuses the command.
_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
_GLOB_SPECIAL = frozenset("*?[]\\")
_SCAN_BATCH = 1000


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)


def _sentinel_addresses(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis://[user:pass@]h1:p1[,h2:p2...]/db`` -> sentinel addresses and master connection kwargs."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"redis.url {url!r}: expected a redis:// URL of the sentinels")
    netloc = parts.netloc
    auth, _, hosts = netloc.rpartition("@")
    kwargs: dict[str, Any] = {}
    if auth:
        user, _, password = auth.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if password:
            kwargs["password"] = unquote(password)
    path = parts.path.strip("/")
    if path:
        if not path.isdigit():
            raise ConfigError(f"redis.url {url!r}: database must be a number, got {path!r}")
        kwargs["db"] = int(path)
    if parts.scheme == "rediss":
        kwargs["ssl"] = True
    addresses: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"redis.url {url!r}: expected host:port of each sentinel, got {item!r}")
        addresses.append((host.strip("[]"), int(port)))
    return addresses, kwargs


def _byte_view(part: bytes | memoryview) -> memoryview:
    view = memoryview(part)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _pool_of(client: Any, name: bytes, *, cluster: bool) -> Any:
    """The connection pool of the node owning ``name``, or ``None`` where the caller should use the
    regular client path (cluster node not known yet)."""
    if not cluster:
        return client.connection_pool
    node = client.get_node_from_key(name)
    if node is None or node.redis_connection is None:
        return None
    return node.redis_connection.connection_pool


def _send_packed(pool: Any, commands: list[list[bytes | memoryview]]) -> bool:
    """Pipeline packed ``SET`` commands on one pooled connection: send them all, then read every
    reply. True once Redis answered all of them OK; False where the caller should send them again
    through the regular client path (redirect, stale or broken connection). A server error such as
    OOM is raised after every reply was read, so the connection stays in step."""
    conn = pool.get_connection()
    try:
        for packed in commands:
            conn.send_packed_command(packed)
        redirected = False
        error: redis.exceptions.ResponseError | None = None
        for _packed in commands:
            try:
                conn.read_response()
            except (MovedError, AskError):
                redirected = True
            except redis.exceptions.ResponseError as exc:
                error = error or exc
    except (redis.exceptions.ConnectionError, OSError):
        conn.disconnect()
        return False  # stale pooled connection or dead node: let redis-py reconnect / refresh
    except BaseException:
        conn.disconnect()  # a timeout or interrupt mid-exchange leaves the stream unusable
        raise
    finally:
        pool.release(conn)
    if redirected:
        return False
    if error is not None:
        raise error
    return True


class RedisTier(Tier):
    """A Redis or Valkey deployment (one node, a Sentinel-managed master, or a Redis Cluster)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        mode: Mode = "single",
        ttl_s: int = 0,
        timeout_s: float = 2.0,
        key_prefix: str = "kvtier:",
        sentinel_master: str = "mymaster",
        name: str = "redis",
    ) -> None:
        if mode not in ("single", "cluster", "sentinel"):
            raise ConfigError(f"redis.mode {mode!r}: expected single, cluster or sentinel")
        if ttl_s < 0 or timeout_s <= 0:
            raise ConfigError(f"redis: ttl_s must be >= 0 and timeout_s > 0, got {ttl_s} and {timeout_s}")
        self.name = name
        self.url = url
        self.mode: Mode = mode
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        self._prefix = key_prefix.encode()
        self._sentinel_master = sentinel_master
        self._lock = threading.Lock()
        self._client: Any = None  # redis.Redis | redis.cluster.RedisCluster, built on first use
        self._sentinel: redis.sentinel.Sentinel | None = None
        self._discarded = 0
        self._options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }
        if mode == "sentinel":
            _sentinel_addresses(url)  # validate now; connect later
        elif urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis.url {url!r}: expected redis://, rediss:// or unix://")

    @classmethod
    def from_config(cls, cfg: RedisConfig) -> RedisTier:
        return cls(
            cfg.url,
            mode=cfg.mode,
            ttl_s=cfg.ttl_s,
            timeout_s=cfg.timeout_s,
            key_prefix=cfg.key_prefix,
            sentinel_master=cfg.sentinel_master,
        )

    # ---- connection ------------------------------------------------------------------------------
    def _build(self) -> Any:
        if self.mode == "single":
            return redis.Redis.from_url(self.url, **self._options)
        if self.mode == "cluster":
            # Connects and reads the slot map now; raises if no seed node answers.
            return redis.cluster.RedisCluster.from_url(
                self.url, require_full_coverage=False, **self._options
            )
        addresses, master_kwargs = _sentinel_addresses(self.url)
        timeouts = {"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s}
        self._sentinel = redis.sentinel.Sentinel(addresses, sentinel_kwargs=timeouts, socket_timeout=self.timeout_s,
                                                 socket_connect_timeout=self.timeout_s)
        return self._sentinel.master_for(self._sentinel_master, **self._options, **master_kwargs)

    def _redis(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build()
                client = self._client
        return client

    def _run(self, op: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)``; translate every client failure into TierUnavailable."""
        try:
            return fn(self._redis())
        except _FAILURES as exc:
            raise TierUnavailable(f"redis {self.mode} {self.url} {op}: {type(exc).__name__}: {exc}") from exc

    def _name(self, key: ChunkKey) -> bytes:
        return self._prefix + key.hex().encode()

    # ---- Tier ------------------------------------------------------------------------------------
    def put(self, key: ChunkKey, frame: bytes) -> None:
        name = self._name(key)
        ex = self.ttl_s or None
        self._run("put", lambda r: r.set(name, frame, ex=ex))

    def put_parts(self, key: ChunkKey, parts: Sequence[bytes | memoryview]) -> None:
        self.put_many([(key, parts)])

    def put_many(self, items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        """One ``SET`` per item whose value is its parts back to back, pipelined per node and written
        to the socket part by part.

        redis-py takes a value as one object, so this sends the packed commands itself on a pooled
        connection of each key's node (saving the join, a copy of every frame). A refused or broken
        connection, a redirect (cluster resharding) or an unknown node sends those items again through
        :meth:`put`, which has redis-py's reconnect and topology-refresh logic.
        """
        if not items:
            return
        cluster = self.mode == "cluster"
        names = [self._name(key) for key, _parts in items]
        packed = [self._packed_set(name, parts) for name, (_key, parts) in zip(names, items)]

        def send(r: Any) -> list[int]:
            groups: dict[int, tuple[Any, list[int]]] = {}
            retry: list[int] = []
            for i, name in enumerate(names):
                pool = _pool_of(r, name, cluster=cluster)
                if pool is None:
                    retry.append(i)
                else:
                    groups.setdefault(id(pool), (pool, []))[1].append(i)
            for pool, idx in groups.values():
                if not _send_packed(pool, [packed[i] for i in idx]):
                    retry.extend(idx)
            return retry

        for i in sorted(self._run("put", send)):
            self.put(items[i][0], b"".join(_byte_view(p) for p in items[i][1]))

    def _packed_set(self, name: bytes, parts: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        """The RESP encoding of ``SET name <parts joined> [EX ttl]``, the value left in pieces."""
        views = [_byte_view(p) for p in parts]
        total = sum(v.nbytes for v in views)
        head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (5 if self.ttl_s else 3, len(name), name, total)
        tail = b"\r\n"
        if self.ttl_s:
            ttl = str(self.ttl_s).encode()
            tail += b"$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)
        return [head, *views, tail]

    def get(self, key: ChunkKey) -> bytes | None:
        name = self._name(key)
        value: bytes | None = self._run("get", lambda r: r.get(name))
        return value

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | memoryview | None]:
        """One ``MGET`` (cluster: one per hash slot, pipelined per node by redis-py), in order."""
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        if self.mode == "cluster":
            return list(self._run("get", lambda r: r.mget_nonatomic(names)))
        return list(self._run("get", lambda r: r.mget(names)))

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self._name(k) for k in keys]

        def batch(r: Any) -> list[bool]:
            pipe = r.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            return [bool(x) for x in pipe.execute()]

        return self._run("exists", batch)

    def delete(self, key: ChunkKey) -> bool:
        name = self._name(key)
        return bool(self._run("delete", lambda r: r.delete(name)))

    def discard(self, key: ChunkKey) -> None:
        self.delete(key)
        with self._lock:
            self._discarded += 1

    def clear(self) -> int:
        pattern = _glob_escape(self.key_prefix) + "?" * (2 * KEY_BYTES)

        def wipe(r: Any) -> int:
            removed = 0
            batch: list[bytes] = []

            def flush() -> int:
                pipe = r.pipeline(transaction=False)
                for name in batch:
                    pipe.unlink(name)
                n = sum(int(x) for x in pipe.execute())
                batch.clear()
                return n

            for name in r.scan_iter(match=pattern, count=_SCAN_BATCH):
                batch.append(name)
                if len(batch) >= _SCAN_BATCH:
                    removed += flush()
            if batch:
                removed += flush()
            return removed

        return self._run("clear", wipe)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            sentinel, self._sentinel = self._sentinel, None
        try:
            if client is not None:
                client.close()
            if sentinel is not None:
                for s in sentinel.sentinels:
                    s.close()
        except _FAILURES:
            log.debug("closing redis client failed", exc_info=True)

    def stats(self) -> dict[str, int | float]:
        return {"discarded": self._discarded}
