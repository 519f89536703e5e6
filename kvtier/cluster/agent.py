"""The worker side of the cluster: runs beside one :class:`~kvtier.engine.CacheEngine`.

It registers the engine with the controller (model, KV spec fingerprint, namespace root, P2P address,
codecs, a snapshot of its CPU keys), heartbeats, pushes the CPU tier's admit/evict events in batches,
long-polls for commands (clear, pin, unpin, fetch, remove, compress, health) and runs them, and serves
the engine's chunks to peers (:class:`~kvtier.cluster.p2p.PeerServer`). Its
:class:`~kvtier.cluster.p2p.PeerTier` lets the engine fetch from peers.

Invariants:
- The engine never waits for the controller: CPU events go into a bounded queue (a callback that only
  appends); when it overflows, or the controller reports a sequence gap, or the session is lost, the
  agent sends a full snapshot instead, so the controller's view converges to the truth.
- An event batch is retried unchanged (same ``seq``) until acknowledged, so a lost reply never causes a
  gap or a double apply.
- A controller outage only delays reports (exponential backoff up to 2 s); the agent re-registers on
  its own when the controller forgets its session (restart, expiry).
- Commands run on a small thread pool, so a long move never stops heartbeats. A fetched chunk enters
  the CPU tier only after its frame's checksum, key, KV spec, parent and token ids were verified.
- The agent never takes its own lock while calling into the CPU tier (the tier calls the agent's
  listener with the tier's lock held), so there is no lock-order inversion.
"""

from __future__ import annotations

import heapq
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from kvtier import wire
from kvtier.backoff import Backoff
from kvtier.cluster import schema as S
from kvtier.cluster.p2p import PeerServer, PeerTier
from kvtier.codec.base import codec_names, get_codec
from kvtier.errors import ConfigError, KvtierError, TierUnavailable
from kvtier.keys import ChunkKey, chain_key
from kvtier.record import ChunkRecord, Kind, token_records
from kvtier.storage.base import Tier
from kvtier.storage.remote import RemoteTier

if TYPE_CHECKING:
    from kvtier.config import ClusterConfig, KvtierConfig
    from kvtier.engine import CacheEngine
    from kvtier.frame_auth import FrameKeys
    from kvtier.layout import KVSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
FETCH_BATCH = 32  # chunks per pipelined GET batch during a move
MAX_TIMED_PINS = 4096
RETRY_BASE_S, RETRY_MAX_S = 0.05, 2.0  # controller calls after a failure: 50 ms doubling up to 2 s


class _SessionLost(Exception):
    """The controller does not know our session (restart or expiry): register again."""


class _ControllerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"controller answered {status}: {message}")
        self.status = status


def _batched(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _coalesce(events: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Runs of same-kind events -> ``Event`` dicts, order kept."""
    out: list[dict[str, Any]] = []
    for kind, key in events:
        if out and out[-1]["kind"] == kind and len(out[-1]["keys"]) < S.MAX_KEYS:
            out[-1]["keys"].append(key.hex())
        else:
            out.append({"kind": kind, "tier": "cpu", "keys": [key.hex()]})
    return out


class Agent:
    """See the module docstring. Create, pass :meth:`tiers` to the engine, then :meth:`start`."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.instance_id = config.instance_id or f"{socket.gethostname()}:{os.getpid()}"
        self.engine: CacheEngine | None = None
        self.peer_tier = PeerTier(self.locate, config.token, config.peer_timeout_s) if config.p2p else None
        self.peer_server: PeerServer | None = None
        self.address = ""
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(base_url=config.controller_url, headers=headers, timeout=config.request_timeout_s,
                                  transport=nodelay)
        self._lock = threading.Lock()
        self._events: deque[tuple[str, bytes]] = deque()
        self._overflow = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._session: str | None = None
        self._secret = ""  # proof that our instance id is ours, issued by the controller at first registration
        self._seq = 0
        self._inflight: dict[str, Any] | None = None
        self._heartbeat_s = 1.0
        self._pins: list[tuple[float, int, list[int]]] = []
        self._pin_counter = 0
        self._threads: list[threading.Thread] = []
        self._executor = ThreadPoolExecutor(config.command_threads, thread_name_prefix="kvtier-agent-cmd")
        self.counters: Counter[str] = Counter()

    # ---- wiring ----------------------------------------------------------------------------------
    def tiers(self) -> list[tuple[Tier, str]]:
        """The lower tiers the engine must be built with (the P2P tier, if enabled), last in order."""
        return [(self.peer_tier, "raw")] if self.peer_tier is not None else []

    def start(self, engine: CacheEngine) -> None:
        """Serve peers, hook the CPU tier and start reporting; returns at once (registration is async)."""
        if self.engine is not None:
            raise RuntimeError("agent already started")
        self.engine = engine
        if self.peer_tier is not None:
            if not engine.storage.has_tier(self.peer_tier):
                log.warning("engine was built without agent.tiers(): it will serve peers but not fetch from them")
            host = self.config.advertise_host or self.config.p2p_host
            if host in ("0.0.0.0", "::", ""):
                raise ConfigError("p2p_host is a wildcard address: set advertise_host to the address peers dial")
            self.peer_server = PeerServer(engine.cpu, self.config.p2p_host, self.config.p2p_port, self.config.token,
                                          auth=engine.storage.auth)
            port = self.peer_server.start()
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        engine.cpu.listeners.append(self._on_cpu)
        for name, target in (("report", self._report_loop), ("poll", self._poll_loop)):
            thread = threading.Thread(target=target, name=f"kvtier-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_registered(self, timeout_s: float) -> bool:
        return self._registered.wait(timeout_s)

    def stop(self) -> None:
        """Deregister (best effort), stop threads and the peer server. Call before ``engine.close()``."""
        self._stop.set()
        self._wake.set()
        if self.engine is not None and self._on_cpu in self.engine.cpu.listeners:
            self.engine.cpu.listeners.remove(self._on_cpu)
        session = self._session
        if session is not None:
            try:
                self._post("/v1/worker/deregister", {"session": session}, timeout=1.0)
            except Exception:
                log.debug("deregistration failed", exc_info=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=1.0)
        if self.peer_server is not None:
            self.peer_server.stop()
        self._http.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _need_engine(self) -> CacheEngine:
        if self.engine is None:
            raise RuntimeError("agent not started")
        return self.engine

    # ---- controller client -----------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        limit = timeout if timeout is not None else self.config.request_timeout_s
        resp = self._http.post(path, json=body, timeout=limit)
        if resp.status_code == 404 and "session" in body and path != "/v1/worker/register":
            raise _SessionLost(path)
        if resp.status_code >= 400:
            try:
                detail = str(resp.json().get("detail", resp.text))
            except ValueError:
                detail = resp.text
            raise _ControllerError(resp.status_code, detail[:500])
        result: dict[str, Any] = resp.json()
        return result

    def _lose_session(self, session: str) -> None:
        with self._lock:
            if self._session == session:
                self._session = None
                self._registered.clear()
                self.counters["sessions_lost"] += 1

    def locate(self, keys: list[ChunkKey]) -> list[list[str]]:
        """Peer addresses holding each key (the :class:`PeerTier`'s locator)."""
        session = self._session
        if session is None:
            return [[] for _ in keys]
        out: list[list[str]] = []
        for batch in _batched(keys, S.MAX_KEYS):
            try:
                resp = self._post("/v1/worker/locate", {"session": session, "keys": [k.hex() for k in batch]},
                                  timeout=self.config.locate_timeout_s)
            except _SessionLost:
                self._lose_session(session)
                return [[] for _ in keys]
            except (httpx.HTTPError, _ControllerError) as exc:
                raise TierUnavailable(f"controller {self.config.controller_url}: {exc}") from exc
            out.extend([h["address"] for h in holders] for holders in resp["holders"])
        return out

    # ---- events ----------------------------------------------------------------------------------
    def _on_cpu(self, kind: str, key: ChunkKey) -> None:
        """CPU-tier listener (called with the tier's lock held): append, never block."""
        with self._lock:
            if self._overflow:
                return
            if len(self._events) >= self.config.event_queue:
                self._overflow = True
                self._events.clear()
                self.counters["event_overflows"] += 1
                return
            self._events.append((kind, key))
            full = len(self._events) >= self.config.batch_max
        if full:
            self._wake.set()

    def _snapshot(self) -> dict[str, list[str]]:
        """Clear the queue, then read the CPU keys (events queued after the clear are replayed on top)."""
        with self._lock:
            self._events.clear()
            self._overflow = False
        keys = self._need_engine().cpu.keys()
        return {"cpu": [k.hex() for k in keys]}

    def _register(self) -> None:
        engine = self._need_engine()
        tiers = self._snapshot()
        body = S.RegisterRequest(
            instance_id=self.instance_id, model=engine.namespace.model, spec=engine.spec.fingerprint(),
            root=engine.namespace.root().hex(), chunk_tokens=engine.spec.chunk_tokens,
            partial=engine.chunker.partial, p2p_address=self.address, codecs=codec_names(), tiers=tiers,
            replace=self.config.replace, secret=self._secret,
        )
        try:
            resp = S.RegisterResponse.model_validate(self._post("/v1/worker/register", body.model_dump()))
        except BaseException:
            with self._lock:
                self._overflow = True  # the snapshot was not delivered: take a new one next time
            raise
        with self._lock:
            self._session, self._seq, self._inflight = resp.session, 0, None
            self._secret = resp.secret
            self._heartbeat_s = resp.heartbeat_s
        self._count("registrations")
        self._registered.set()
        log.info("registered with %s as %s", self.config.controller_url, self.instance_id)

    def _flush(self, session: str) -> bool:
        """Send queued events (or a snapshot); True if anything was sent."""
        if self._inflight is None:
            with self._lock:
                overflow = self._overflow
                taken = [] if overflow else [self._events.popleft()
                                             for _ in range(min(len(self._events), self.config.batch_max))]
            if overflow:
                tiers = self._snapshot()
                try:
                    self._post("/v1/worker/snapshot", {"session": session, "seq": self._seq + 1, "tiers": tiers})
                except BaseException:
                    with self._lock:
                        self._overflow = True
                    raise
                self._seq += 1
                self._count("snapshots")
                return True
            if not taken:
                return False
            self._inflight = {"session": session, "seq": self._seq + 1, "events": _coalesce(taken)}
        try:
            self._post("/v1/worker/events", self._inflight)
        except _ControllerError as exc:
            if exc.status != 409:
                raise
            with self._lock:  # sequence gap: resynchronise with a snapshot
                self._overflow = True
            self._inflight = None
            return self._flush(session)
        self._seq = self._inflight["seq"]
        self._count("events_sent", sum(len(e["keys"]) for e in self._inflight["events"]))
        self._inflight = None
        return True

    def _report_loop(self) -> None:
        retry = Backoff(RETRY_BASE_S, RETRY_MAX_S)
        last_contact = 0.0
        while not self._stop.is_set():
            session = self._session
            try:
                if session is None:
                    self._register()
                else:
                    self._expire_pins()
                    if self._flush(session):
                        last_contact = time.monotonic()
                    elif time.monotonic() - last_contact >= self._heartbeat_s:
                        self._post("/v1/worker/heartbeat", {"session": session})
                        last_contact = time.monotonic()
                retry.succeeded()
            except _SessionLost:
                self._lose_session(session or "")
                continue
            except (httpx.HTTPError, _ControllerError) as exc:
                self._count("controller_errors")
                delay = retry.failed()
                log.warning("controller %s: %s (retry in %.2fs)", self.config.controller_url, exc, delay)
                self._stop.wait(delay)
                continue
            except Exception:
                log.exception("agent report loop error")
                self._stop.wait(retry.failed())
                continue
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()

    # ---- commands --------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        retry = Backoff(RETRY_BASE_S, RETRY_MAX_S)
        wait = self.config.poll_wait_s
        while not self._stop.is_set():
            if not self._registered.wait(0.2):
                continue
            session = self._session
            if session is None:
                continue
            try:
                resp = self._post("/v1/worker/poll", {"session": session, "wait_s": wait},
                                  timeout=wait + self.config.request_timeout_s)
                retry.succeeded()
            except _SessionLost:
                self._lose_session(session)
                continue
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("poll failed: %s", exc)
                self._stop.wait(retry.failed())
                continue
            for command in resp.get("commands", []):
                self._executor.submit(self._run_command, session, command)

    def _run_command(self, session: str, command: dict[str, Any]) -> None:
        kind = command.get("kind", "")
        handler = getattr(self, f"_cmd_{kind}", None)
        ok, result, error = False, {}, ""
        try:
            if handler is None:
                raise KvtierError(f"unknown command {kind!r}")
            result = handler(command.get("args") or {})
            ok = True
        except Exception as exc:
            log.warning("command %s failed: %s", kind, exc)
            error = f"{type(exc).__name__}: {exc}"
        self._count(f"commands_{'ok' if ok else 'failed'}")
        try:
            self._post("/v1/worker/result", {"session": session, "command_id": command.get("id", ""), "ok": ok,
                                             "result": result, "error": error[:4000]})
        except Exception as exc:
            log.warning("could not report the result of %s: %s", kind, exc)

    def _cmd_health(self, args: dict[str, Any]) -> dict[str, Any]:
        engine = self._need_engine()
        return {"storage": engine.storage.healthy(), "cpu_chunks": len(engine.cpu),
                "cpu_used_bytes": engine.cpu.used_bytes, "cpu_capacity_bytes": engine.cpu.capacity_bytes,
                "events_queued": len(self._events)}

    def _cmd_clear(self, args: dict[str, Any]) -> dict[str, Any]:
        engine = self._need_engine()
        removed = engine.cpu.clear() if args.get("tier") == "cpu" else engine.clear()
        return {"removed": removed}

    def _cmd_pin(self, args: dict[str, Any]) -> dict[str, Any]:
        engine = self._need_engine()
        tokens = list(args["token_ids"])
        ttl = args.get("ttl_s")
        if ttl:
            with self._lock:
                if len(self._pins) >= MAX_TIMED_PINS:
                    raise KvtierError(f"{len(self._pins)} timed pins are active; unpin some first")
        pinned = engine.pin(tokens)
        if ttl and pinned:
            with self._lock:
                self._pin_counter += 1
                heapq.heappush(self._pins, (time.monotonic() + float(ttl), self._pin_counter, tokens))
        return {"pinned_tokens": pinned}

    def _cmd_unpin(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"unpinned_tokens": self._need_engine().unpin(list(args["token_ids"]))}

    def _expire_pins(self) -> None:
        now = time.monotonic()
        due: list[list[int]] = []
        with self._lock:
            while self._pins and self._pins[0][0] <= now:
                due.append(heapq.heappop(self._pins)[2])
        for tokens in due:
            self._need_engine().unpin(tokens)
            self._count("pins_expired")

    def _cmd_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        engine = self._need_engine()
        removed = 0
        for key in (bytes.fromhex(k) for k in args.get("keys", [])):
            removed += int(engine.cpu.remove(key))
            engine.storage.delete(key)
        return {"removed": removed}

    def _peer(self, address: str) -> RemoteTier:
        if self.peer_tier is not None:
            return self.peer_tier.client(address)
        from kvtier.cluster.p2p import split_address

        host, port = split_address(address)
        return RemoteTier(host, port, self.config.token, self.config.peer_timeout_s, pool_size=1, retries=1)

    def _cmd_fetch(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pull chunks from peer ``args["peer"]``: a prompt's (``token_ids``) or listed ``keys``."""
        engine = self._need_engine()
        peer = self._peer(str(args["peer"]))
        outcome: Counter[str] = Counter()
        held: list[str] = []
        tokens_fetched = 0
        items: list[ChunkRecord | ChunkKey]  # a record when the prompt is known, else only the key
        if args.get("token_ids") is not None:
            arr, chunks = engine.chunker.chunks(args["token_ids"])
            items = list(token_records(chunks, arr))
        else:
            items = [bytes.fromhex(k) for k in args.get("keys", [])]
        for batch in _batched(items, FETCH_BATCH):
            got = peer.get_many([item if isinstance(item, bytes) else item.key for item in batch])
            for item, frame in zip(batch, got):
                if frame is None:
                    outcome["missing"] += 1
                    continue
                if isinstance(item, bytes):  # only the key is known: the frame must prove it
                    record = self._proven_record(frame, item, engine.storage.auth)
                    if record is None:
                        outcome["mismatch"] += 1
                        continue
                else:
                    record = item
                what = engine.admit_frame(record, frame)
                outcome[what] += 1
                if what in ("fetched", "present"):
                    held.append(record.key.hex())
                    tokens_fetched += record.num_tokens if what == "fetched" else 0
        return {"chunks": outcome["fetched"], "tokens": tokens_fetched, "already_present": outcome["present"],
                "missing": outcome["missing"], "rejected": outcome["corrupt"] + outcome["mismatch"],
                "full": outcome["full"], "keys": held}

    @staticmethod
    def _proven_record(frame: bytes | memoryview, key: ChunkKey, auth: FrameKeys | None) -> ChunkRecord | None:
        """The record of a token-chunk frame whose key is ``H(parent || tokens)`` = ``key``, else None."""
        try:
            meta, _payload = wire.unpack_meta(frame, auth)
        except KvtierError:
            return None
        if meta.kind != Kind.TOKENS or chain_key(meta.parent, meta.identity) != key:
            return None
        return meta.record()

    def _cmd_compress(self, args: dict[str, Any]) -> dict[str, Any]:
        """Re-encode chunks with ``args["codec"]`` into every writable lower tier of the engine."""
        engine = self._need_engine()
        codec = str(args["codec"])
        get_codec(codec)
        targets = engine.storage.writable_tiers()
        if not targets:
            raise KvtierError("this instance has no serialized tier (disk, server, redis, fs) to re-encode into")
        if args.get("token_ids") is not None:
            arr, chunks = engine.chunker.chunks(args["token_ids"])
            items = token_records(chunks, arr)
        else:
            items = []
            resident = engine.cpu.keys()
            for key in resident:
                got = engine.cpu.acquire_key(key)
                if got is None:
                    continue
                slot, record = got
                engine.cpu.release(slot)
                items.append(record)
        raw = encoded = done = missing = failed = 0
        for record in items:
            frame = engine.encode_chunk(record, codec)
            if frame is None:
                missing += 1
                continue
            done += 1
            raw += record.num_tokens * engine.spec.bytes_per_token
            encoded += len(frame)
            failed += engine.storage.put_frame(record.key, frame)
        return {"chunks": done, "missing": missing, "raw_bytes": raw, "encoded_bytes": encoded,
                "ratio": round(raw / encoded, 4) if encoded else 0.0, "codec": codec,
                "tiers": targets, "tier_writes_failed": failed}

    # ---- numbers ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, int | float]]:
        """``{"agent": ..., "p2p_server": ...}`` (a metrics source, see :class:`kvtier.metrics.EngineMetrics`)."""
        with self._lock:
            agent: dict[str, int | float] = dict(self.counters)
            agent["events_queued"] = len(self._events)
            agent["timed_pins"] = len(self._pins)
        agent["registered"] = int(self._registered.is_set())
        out = {"agent": agent}
        if self.peer_server is not None:
            out["p2p_server"] = self.peer_server.stats()
        return out


def start_engine(spec: KVSpec, model: str, config: KvtierConfig | None = None) -> tuple[CacheEngine, Agent]:
    """Build a :class:`CacheEngine` whose lower tiers end with the P2P tier, and start its agent (settings:
    the config's ``cluster`` section; ``cluster.enabled`` is the caller's decision and not checked)."""
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.storage.factory import build_tiers

    cfg = config or load_config()
    agent = Agent(cfg.cluster)
    engine: CacheEngine | None = None
    try:  # a spec whose chunk_tokens differs from the config's is CacheEngine's ConfigError
        engine = CacheEngine(spec, model, cfg, tiers=[*build_tiers(cfg, spec), *agent.tiers()])
        agent.start(engine)
    except BaseException:
        agent.stop()
        if engine is not None:
            engine.close()
        raise
    return engine, agent
