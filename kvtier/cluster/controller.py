"""``kvtier controller``: the cluster's HTTP API and worker channel (FastAPI; no torch in this process).

Workers (one :class:`~kvtier.cluster.agent.Agent` per engine) register, heartbeat, report CPU-tier
admit/evict events and long-poll for commands over ``/v1/worker/*``; operators and routers use the
public routes (OpenAPI at ``/openapi.json``).

Invariants:
- Binds 127.0.0.1 by default; refuses a non-loopback address without a token. With tokens, every
  route but ``GET /health``, ``GET /healthz`` and the OpenAPI document needs ``Authorization: Bearer``
  with a token granting the route's role (:mod:`kvtier.net`'s :class:`~kvtier.net.Gate`, which decides
  from the headers, before the body is read or parsed):
  ``worker`` (``/v1/worker/*``), ``read`` (lookup, instances, operation status, instance health,
  metrics: lookups reveal what prompts are cached) and ``admin`` (every mutating route). The admin
  token grants all three roles, the read token ``read``, the worker token ``worker``.
- An instance id belongs to whoever registered it first: registration answers a per-instance secret,
  and registering that id again (``replace`` included) requires it, while the instance lives and for
  ``claim_ttl_s`` after it expired (a clean deregistration frees the id at once). Heartbeats, events
  and commands need the session, which only such a registration receives. A controller that restarted
  adopts the secret the first registration of an id presents.
- A worker that has not been heard from for ``ttl_s`` is dropped with all its index entries; its
  pending commands fail at once. A new registration under a live instance id is refused (409) unless
  it asks to replace it.
- Text lookups tokenize only with the tokenizers the operator configured (``tokenizers``): a model
  name a client sends is never opened as a path.
- Event batches are applied in ``seq`` order; a gap answers 409 and the worker re-sends a snapshot, so
  the index converges to the workers' true state even after lost messages or a controller restart
  (workers whose session is unknown re-register, with a snapshot).
- Mutating routes start an asynchronous operation and return its id (202 while it runs, 200 once done
  or failed); ``/check_finish`` reports it. A failed operation is a result (``status: failed`` with the
  reason), not a 5xx: 5xx would only mean a controller bug. At most ``max_ops`` operations are kept;
  when all of them are unfinished a new one gets 429.
- Every command to a worker has a timeout; nothing waits on a dead worker longer than that.
- Memory is bounded: the index (see :mod:`kvtier.cluster.index`), instances (``max_instances``),
  operations, per-worker command queues and request bodies (``max_body_bytes``) all have caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from kvtier.cluster import schema as S
from kvtier.cluster.index import ChunkIndex, chain_keys
from kvtier.config import ControllerConfig
from kvtier.net import BearerAuth, Gate, serve_http, token_matches

log = logging.getLogger(__name__)


# ---- settings and errors ---------------------------------------------------------------------------
ROLES = ("admin", "read", "worker")


def bearer_auth(settings: ControllerConfig) -> BearerAuth:
    """The roles each configured token grants (the admin token grants every role)."""
    return BearerAuth({settings.token: frozenset(ROLES), settings.read_token: frozenset({"read"}),
                       settings.worker_token: frozenset({"worker"})})


class ApiError(Exception):
    """An error answered with ``status`` and ``{"detail": message}``."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Invalid(ApiError):
    status = 422


class TooBusy(ApiError):
    status = 429


class Forbidden(ApiError):
    status = 403


class OpFailed(Exception):
    """An operation step failed; the message says why (it becomes the operation's ``error``)."""


# ---- state -----------------------------------------------------------------------------------------
@dataclass
class Worker:
    """One registered engine instance."""

    info: S.RegisterRequest
    session: str
    root: bytes
    registered: float
    last_seen: float
    queue: asyncio.Queue[S.Command]
    seq: int = 0
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    def fail_pending(self, reason: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(OpFailed(reason))
        self.pending.clear()


@dataclass
class Op:
    id: str
    kind: str
    created: float
    status: S.OpStatus = "pending"
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    task: asyncio.Task[None] | None = None

    def view(self) -> S.OpResponse:
        return S.OpResponse(op_id=self.id, kind=self.kind, status=self.status, result=self.result,
                            error=self.error, age_s=round(time.monotonic() - self.created, 3))


class Tokenizers:
    """Tokenizers per model, only from the operator's allow-list (``--tokenizer MODEL=PATH``: a
    tokenizer.json, its directory, or a model id in the local Hugging Face cache, never the network),
    loaded on first use. A model name that is not on the list is refused, never opened."""

    def __init__(self, paths: dict[str, str], cap: int = 8) -> None:
        self.paths = dict(paths)
        self.cap = cap
        self._loaded: OrderedDict[str, Callable[[str], list[int]]] = OrderedDict()

    def _load(self, source: str) -> Callable[[str], list[int]]:
        where = Path(source).expanduser()
        file = where if where.is_file() else where / "tokenizer.json"
        from kvtier.extras import require

        if file.is_file():
            tok = require("tokenizers", "router").Tokenizer.from_file(str(file))
            return lambda text: list(tok.encode(text).ids)
        auto = require("transformers", "router").AutoTokenizer
        hf = auto.from_pretrained(str(where) if where.exists() else source, local_files_only=True)
        return lambda text: list(hf(text)["input_ids"])

    async def encode(self, model: str, text: str) -> list[int]:
        fn = self._loaded.get(model)
        if fn is None:
            source = self.paths.get(model)
            if source is None:
                raise Invalid(f"no tokenizer is configured for model {model!r}; pass token_ids instead, or start "
                              f"the controller with --tokenizer {model}=PATH")
            try:
                fn = await asyncio.to_thread(self._load, source)
            except Exception as exc:
                raise Invalid(
                    f"cannot load a tokenizer for model {model!r} ({type(exc).__name__}: {exc}); pass "
                    f"token_ids instead, or start the controller with --tokenizer {model}=PATH"
                ) from None
            self._loaded[model] = fn
            while len(self._loaded) > self.cap:
                self._loaded.popitem(last=False)
        return await asyncio.to_thread(fn, text)


@dataclass
class Claim:
    """Ownership of an instance id: the secret issued at its first registration; ``expired_at`` is set
    once its worker expired (the claim then lasts ``claim_ttl_s`` more)."""

    secret: str
    expired_at: float | None = None


class Controller:
    """Registry, index and operations. Every method runs on the controller's one event loop."""

    def __init__(self, settings: ControllerConfig) -> None:
        self.settings = settings
        self.index = ChunkIndex(settings.max_keys_per_instance, settings.max_keys_total)
        self.workers: dict[str, Worker] = {}  # instance id -> worker
        self.sessions: dict[str, Worker] = {}
        self.claims: dict[str, Claim] = {}  # instance id -> its owner's secret
        self.ops: OrderedDict[str, Op] = OrderedDict()
        self.tokenizers = Tokenizers(settings.tokenizers)
        self.started = time.monotonic()
        from kvtier.metrics import ControllerMetrics

        self.metrics = ControllerMetrics(self)

    # ---- registry --------------------------------------------------------------------------------
    def register(self, req: S.RegisterRequest) -> S.RegisterResponse:
        now = time.monotonic()
        claim = self.claims.get(req.instance_id)
        if claim is not None and not token_matches(req.secret, claim.secret):
            self.metrics.count("ownership_refusals")
            raise Forbidden(f"instance id {req.instance_id!r} belongs to an earlier registration; only the holder of "
                            "the secret it was issued may register it again (pick another id)")
        old = self.workers.get(req.instance_id)
        if old is not None and not req.replace and now - old.last_seen <= self.settings.ttl_s:
            raise Conflict(f"instance id {req.instance_id!r} is held by a live session (last heard "
                           f"{now - old.last_seen:.1f}s ago); pick another id or register with replace=true")
        if old is None and len(self.workers) >= self.settings.max_instances:
            raise TooBusy(f"the controller already tracks {len(self.workers)} instances (max_instances)")
        if old is not None:
            self._drop(old, "re-registered")
        worker = Worker(info=req.model_copy(update={"tiers": {}, "secret": ""}), session=secrets.token_hex(16),
                        root=bytes.fromhex(req.root), registered=now, last_seen=now,
                        queue=asyncio.Queue(self.settings.command_queue))
        self.workers[req.instance_id] = worker
        self.sessions[worker.session] = worker
        secret = claim.secret if claim is not None else req.secret or secrets.token_hex(32)
        self.claims[req.instance_id] = Claim(secret)
        self.index.replace(req.instance_id, {t: map(bytes.fromhex, keys) for t, keys in req.tiers.items()})
        self.metrics.count("registrations")
        log.info("instance %s registered (model %s, spec %s, p2p %s)", req.instance_id, req.model, req.spec,
                 req.p2p_address or "off")
        return S.RegisterResponse(session=worker.session, secret=secret, heartbeat_s=self.settings.heartbeat,
                                  ttl_s=self.settings.ttl_s)

    def session(self, session: str) -> Worker:
        worker = self.sessions.get(session)
        if worker is None:
            raise NotFound("unknown session (expired or never registered): register again")
        worker.last_seen = time.monotonic()
        return worker

    def deregister(self, session: str) -> None:
        worker = self.session(session)
        self._drop(worker, "deregistered")
        self.claims.pop(worker.instance_id, None)

    def _drop(self, worker: Worker, reason: str) -> None:
        if self.workers.get(worker.instance_id) is worker:
            del self.workers[worker.instance_id]
            self.index.drop(worker.instance_id)
        self.sessions.pop(worker.session, None)
        worker.fail_pending(f"instance {worker.instance_id} {reason}")
        log.info("instance %s %s", worker.instance_id, reason)

    def expire(self) -> list[str]:
        """Drop every worker silent for longer than ``ttl_s``; return their ids."""
        now = time.monotonic()
        dead = [w for w in self.workers.values() if now - w.last_seen > self.settings.ttl_s]
        for worker in dead:
            self._drop(worker, f"expired (silent for {now - worker.last_seen:.1f}s)")
            self.metrics.count("expirations")
            claim = self.claims.get(worker.instance_id)
            if claim is not None:
                claim.expired_at = now
        self._expire_claims(now)
        return [w.instance_id for w in dead]

    def _expire_claims(self, now: float) -> None:
        """Forget claims of instances expired ``claim_ttl_s`` ago, and the oldest beyond ``max_instances``."""
        stale = sorted((c.expired_at, i) for i, c in self.claims.items()
                       if c.expired_at is not None and i not in self.workers)
        excess = len(stale) - self.settings.max_instances
        for n, (expired_at, instance_id) in enumerate(stale):
            if n < excess or now - expired_at > self.settings.claim_ttl_s:
                del self.claims[instance_id]

    def instance(self, instance_id: str) -> Worker:
        worker = self.workers.get(instance_id)
        if worker is None:
            known = ", ".join(sorted(self.workers)[:20]) or "none"
            raise NotFound(f"unknown instance {instance_id!r}; live instances: {known}")
        return worker

    # ---- worker channel --------------------------------------------------------------------------
    def events(self, req: S.EventsRequest) -> S.SeqResponse:
        worker = self.session(req.session)
        if req.seq <= worker.seq:  # a retry of a batch already applied
            return S.SeqResponse(seq=worker.seq)
        if req.seq != worker.seq + 1:
            raise Conflict(f"event sequence gap: expected {worker.seq + 1}, got {req.seq}; send a snapshot")
        for event in req.events:
            keys = map(bytes.fromhex, event.keys)
            if event.kind == "admit":
                self.index.admit(worker.instance_id, event.tier, keys)
            else:
                self.index.evict(worker.instance_id, event.tier, keys)
            self.metrics.count(f"events_{event.kind}", len(event.keys))
        worker.seq = req.seq
        return S.SeqResponse(seq=worker.seq)

    def snapshot(self, req: S.SnapshotRequest) -> S.SeqResponse:
        worker = self.session(req.session)
        self.index.replace(worker.instance_id, {t: map(bytes.fromhex, k) for t, k in req.tiers.items()})
        worker.seq = req.seq
        self.metrics.count("snapshots")
        return S.SeqResponse(seq=worker.seq)

    async def poll(self, req: S.PollRequest) -> S.PollResponse:
        worker = self.session(req.session)
        commands: list[S.Command] = []
        with contextlib.suppress(asyncio.TimeoutError):  # wait_for's (TimeoutError from 3.11 on)
            commands.append(await asyncio.wait_for(worker.queue.get(), req.wait_s))
            while len(commands) < req.max_commands and not worker.queue.empty():
                commands.append(worker.queue.get_nowait())
        worker.last_seen = time.monotonic()
        return S.PollResponse(commands=commands)

    def result(self, req: S.ResultRequest) -> S.Accepted:
        worker = self.session(req.session)
        fut = worker.pending.pop(req.command_id, None)
        if fut is None or fut.done():
            return S.Accepted(accepted=False)  # late answer to a command that timed out
        if req.ok:
            fut.set_result(req.result)
        else:
            fut.set_exception(OpFailed(f"instance {worker.instance_id}: {req.error or 'command failed'}"))
        return S.Accepted(accepted=True)

    def locate(self, req: S.LocateRequest) -> S.LocateResponse:
        asker = self.session(req.session)
        out: list[list[S.Holder]] = []
        for key_hex in req.keys:
            holders = []
            for inst in self.index.holders(bytes.fromhex(key_hex)):
                w = self.workers.get(inst)
                if w is not None and w is not asker and w.root == asker.root and w.info.p2p_address:
                    holders.append(S.Holder(instance_id=inst, address=w.info.p2p_address))
            out.append(holders)
        self.metrics.count("locates")
        return S.LocateResponse(holders=out)

    async def call(self, worker: Worker, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send one command to ``worker`` and wait for its result (bounded by ``command_timeout_s``)."""
        command = S.Command(id=secrets.token_hex(8), kind=kind, args=args)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            worker.queue.put_nowait(command)
        except asyncio.QueueFull:
            raise OpFailed(f"instance {worker.instance_id} has {worker.queue.qsize()} commands queued") from None
        worker.pending[command.id] = fut
        timeout = self.settings.command_timeout_s
        try:
            result = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.metrics.count("command_timeouts")
            raise OpFailed(f"instance {worker.instance_id} did not answer {kind} within {timeout:g}s") from None
        finally:
            worker.pending.pop(command.id, None)
        self.metrics.count(f"commands_{kind}")
        return result

    # ---- operations ------------------------------------------------------------------------------
    async def start_op(self, kind: str, work: Callable[[], Awaitable[dict[str, Any]]], wait_s: float) -> Op:
        """Run ``work`` as operation ``kind``; wait up to ``wait_s`` for it; return the op."""
        self._trim_ops()
        op = Op(id=f"{kind}-{secrets.token_hex(8)}", kind=kind, created=time.monotonic())

        async def run() -> None:
            op.status = "running"
            try:
                op.result = await work()
                op.status = "done"
            except OpFailed as exc:
                op.error, op.status = str(exc), "failed"
            except Exception as exc:  # a bug in one operation must not take the controller down
                log.exception("operation %s failed", op.id)
                op.error, op.status = f"internal error: {type(exc).__name__}: {exc}", "failed"
            self.metrics.count(f"ops_{op.status}")

        op.task = asyncio.get_running_loop().create_task(run())
        self.ops[op.id] = op
        if wait_s > 0:
            await asyncio.wait({op.task}, timeout=wait_s)
        return op

    def _trim_ops(self) -> None:
        if len(self.ops) < self.settings.max_ops:
            return
        for op_id in [i for i, o in self.ops.items() if o.status in ("done", "failed")]:
            del self.ops[op_id]
            if len(self.ops) < self.settings.max_ops:
                return
        raise TooBusy(f"{len(self.ops)} operations are still running (max_ops); retry later")

    def op(self, op_id: str) -> Op:
        op = self.ops.get(op_id)
        if op is None:
            raise NotFound(f"unknown operation {op_id!r} (never started, or forgotten after max_ops newer ones)")
        return op

    # ---- lookup ----------------------------------------------------------------------------------
    async def lookup(self, req: S.LookupRequest) -> S.LookupResponse:
        start = time.perf_counter()
        workers = [w for w in self.workers.values() if w.info.model == req.model]
        if not workers:
            served = ", ".join(sorted({w.info.model for w in self.workers.values()})[:20]) or "none"
            raise NotFound(f"no live instance serves model {req.model!r}; models served: {served}")
        if req.token_ids is not None:
            token_ids = req.token_ids
        else:
            token_ids = await self.tokenizers.encode(req.model, req.text or "")
        tokens = np.asarray(token_ids, dtype="<u4")
        groups: dict[tuple[bytes, int, bool], list[str]] = {}
        for w in workers:
            groups.setdefault((w.root, w.info.chunk_tokens, w.info.partial), []).append(w.instance_id)
        hits: dict[str, S.InstanceHit] = {}
        for (root, chunk_tokens, partial), members in groups.items():
            chain = chain_keys(root, tokens, chunk_tokens, partial)
            for inst, n in self.index.prefix([key for _end, key in chain], members).items():
                hits[inst] = S.InstanceHit(hit_tokens=chain[n - 1][0], hit_chunks=n)
        best = max(hits, key=lambda i: (hits[i].hit_tokens, i), default=None)
        self.metrics.observe_lookup(time.perf_counter() - start)
        return S.LookupResponse(model=req.model, num_tokens=len(tokens), instances=hits, best=best)

    # ---- instance commands -----------------------------------------------------------------------
    async def clear(self, req: S.ClearRequest) -> Op:
        worker = self.instance(req.instance_id)
        return await self.start_op("clear", lambda: self.call(worker, "clear", {"tier": req.tier}), req.wait_s)

    async def pin(self, req: S.PinRequest) -> Op:
        worker = self.instance(req.instance_id)
        args = {"token_ids": req.token_ids, "ttl_s": req.ttl_s}
        return await self.start_op("pin", lambda: self.call(worker, "pin", args), req.wait_s)

    async def unpin(self, req: S.UnpinRequest) -> Op:
        worker = self.instance(req.instance_id)
        return await self.start_op("unpin", lambda: self.call(worker, "unpin", {"token_ids": req.token_ids}),
                                   req.wait_s)

    async def compress(self, req: S.CompressRequest) -> Op:
        worker = self.instance(req.instance_id)
        if req.codec not in worker.info.codecs:
            raise Invalid(f"codec {req.codec!r} is not available on instance {req.instance_id}; "
                          f"it has {worker.info.codecs}")
        args: dict[str, Any] = {"codec": req.codec, "token_ids": req.token_ids}
        return await self.start_op("compress", lambda: self.call(worker, "compress", args), req.wait_s)

    async def move(self, req: S.MoveRequest) -> Op:
        src, dst = self.instance(req.source), self.instance(req.destination)
        if src is dst:
            raise Invalid("source and destination are the same instance")
        if src.root != dst.root:
            raise Conflict(f"instances {src.instance_id} and {dst.instance_id} cannot share chunks: model, KV "
                           f"spec or tenant differ ({src.info.model} {src.info.spec} vs "
                           f"{dst.info.model} {dst.info.spec})")
        if not src.info.p2p_address:
            raise Conflict(f"instance {src.instance_id} serves no chunks to peers (no p2p address)")
        args: dict[str, Any] = {"peer": src.info.p2p_address, "peer_instance": src.instance_id}
        if req.token_ids is not None:
            args["token_ids"] = req.token_ids
        else:
            args["keys"] = [k.hex() for k in self.index.keys_of(src.instance_id)]

        async def work() -> dict[str, Any]:
            result = await self.call(dst, "fetch", args)
            if not req.copy_chunks and result.get("keys"):
                removed = await self.call(src, "remove", {"keys": result["keys"]})
                result["removed_from_source"] = removed.get("removed", 0)
            result.pop("keys", None)
            return result

        return await self.start_op("move", work, req.wait_s)

    async def health(self, req: S.HealthRequest) -> S.InstanceHealth:
        worker = self.instance(req.instance_id)
        start = time.perf_counter()
        try:
            detail = await asyncio.wait_for(self.call(worker, "health", {}), req.timeout_s)
            status = "ok"
        except asyncio.TimeoutError:
            detail, status = {"error": f"no answer within {req.timeout_s:g}s"}, "timeout"
        except OpFailed as exc:
            detail, status = {"error": str(exc)}, "error"
        return S.InstanceHealth(instance_id=worker.instance_id, status=status,
                                latency_s=round(time.perf_counter() - start, 6), detail=detail)

    def instances(self) -> S.InstancesResponse:
        now = time.monotonic()
        return S.InstancesResponse(instances=[
            S.InstanceInfo(instance_id=w.instance_id, model=w.info.model, spec=w.info.spec,
                           chunk_tokens=w.info.chunk_tokens, p2p_address=w.info.p2p_address,
                           codecs=w.info.codecs, keys=self.index.counts(w.instance_id),
                           truncated=w.instance_id in self.index.truncated, age_s=round(now - w.registered, 3),
                           last_seen_s=round(now - w.last_seen, 3))
            for w in sorted(self.workers.values(), key=lambda w: w.instance_id)
        ])

    def overview(self) -> S.ControllerHealth:
        return S.ControllerHealth(status="ok", instances=len(self.workers), index_keys=len(self.index),
                                  uptime_s=round(time.monotonic() - self.started, 3))

    async def sweep_forever(self) -> None:
        interval = max(0.05, min(1.0, self.settings.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.expire()


# ---- HTTP ------------------------------------------------------------------------------------------
def create_app(settings: ControllerConfig) -> Any:
    """The FastAPI app (``app.state.controller`` is the :class:`Controller`)."""
    ctl = Controller(settings)
    # Declares the bearer scheme in the OpenAPI document; the check itself is the Gate's, before the body.
    bearer = [Security(HTTPBearer(auto_error=False, description="A controller token: admin (--token), read "
                                  "(--read-token) or worker (--worker-token), as the route's role needs."))]

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.get_running_loop().create_task(ctl.sweep_forever())
        yield
        sweeper.cancel()
        for worker in list(ctl.workers.values()):
            worker.fail_pending("controller shutting down")

    app = FastAPI(title="kvtier controller", version="1", lifespan=lifespan,
                  description="Cluster index and cache management for kvtier instances.")
    app.state.controller = ctl

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        ctl.metrics.http(getattr(route, "path", "unmatched"), request.method, response.status_code)
        return response

    public = APIRouter()
    read_api = APIRouter(dependencies=bearer)
    api = APIRouter(dependencies=bearer)
    worker_api = APIRouter(prefix="/v1/worker", tags=["worker channel"], dependencies=bearer)

    def op_response(op: Op) -> JSONResponse:
        code = 202 if op.status in ("pending", "running") else 200
        return JSONResponse(op.view().model_dump(), status_code=code)

    op_responses: dict[int | str, dict[str, Any]] = {202: {"model": S.OpResponse, "description": "Still running."}}

    @public.get("/health", response_model=S.ControllerHealth, summary="Controller liveness and size")
    async def health() -> S.ControllerHealth:
        return ctl.overview()

    @public.get("/healthz", response_class=PlainTextResponse, summary="Kubernetes probe")
    async def healthz() -> str:
        return "ok"

    @read_api.get("/instances", response_model=S.InstancesResponse, summary="Live instances")
    async def instances() -> S.InstancesResponse:
        return ctl.instances()

    @read_api.post("/lookup", response_model=S.LookupResponse, summary="Cached prefix length per instance")
    async def lookup(req: S.LookupRequest) -> S.LookupResponse:
        return await ctl.lookup(req)

    @api.post("/clear", response_model=S.OpResponse, responses=op_responses, summary="Drop unpinned chunks")
    async def clear(req: S.ClearRequest) -> JSONResponse:
        return op_response(await ctl.clear(req))

    @api.post("/pin", response_model=S.OpResponse, responses=op_responses, summary="Pin a prompt's chunks")
    async def pin(req: S.PinRequest) -> JSONResponse:
        return op_response(await ctl.pin(req))

    @api.post("/unpin", response_model=S.OpResponse, responses=op_responses, summary="Unpin a prompt's chunks")
    async def unpin(req: S.UnpinRequest) -> JSONResponse:
        return op_response(await ctl.unpin(req))

    @api.post("/move", response_model=S.OpResponse, responses=op_responses, summary="Copy chunks between instances")
    async def move(req: S.MoveRequest) -> JSONResponse:
        return op_response(await ctl.move(req))

    @api.post("/compress", response_model=S.OpResponse, responses=op_responses, summary="Re-encode chunks")
    async def compress(req: S.CompressRequest) -> JSONResponse:
        return op_response(await ctl.compress(req))

    @read_api.post("/check_finish", response_model=S.OpResponse, summary="Status of an operation")
    async def check_finish(req: S.CheckFinishRequest) -> S.OpResponse:
        return ctl.op(req.op_id).view()

    @read_api.post("/health", response_model=S.InstanceHealth, summary="Ask one instance how it is")
    async def instance_health(req: S.HealthRequest) -> S.InstanceHealth:
        return await ctl.health(req)

    @read_api.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> Response:
        body, content_type = ctl.metrics.render()
        return Response(body, media_type=content_type)

    @worker_api.post("/register", response_model=S.RegisterResponse)
    async def w_register(req: S.RegisterRequest) -> S.RegisterResponse:
        return ctl.register(req)

    @worker_api.post("/heartbeat", response_model=S.Accepted)
    async def w_heartbeat(req: S.SessionRequest) -> S.Accepted:
        ctl.session(req.session)
        return S.Accepted(accepted=True)

    @worker_api.post("/deregister", response_model=S.Accepted)
    async def w_deregister(req: S.SessionRequest) -> S.Accepted:
        ctl.deregister(req.session)
        return S.Accepted(accepted=True)

    @worker_api.post("/events", response_model=S.SeqResponse)
    async def w_events(req: S.EventsRequest) -> S.SeqResponse:
        return ctl.events(req)

    @worker_api.post("/snapshot", response_model=S.SeqResponse)
    async def w_snapshot(req: S.SnapshotRequest) -> S.SeqResponse:
        return ctl.snapshot(req)

    @worker_api.post("/poll", response_model=S.PollResponse)
    async def w_poll(req: S.PollRequest) -> S.PollResponse:
        return await ctl.poll(req)

    @worker_api.post("/result", response_model=S.Accepted)
    async def w_result(req: S.ResultRequest) -> S.Accepted:
        return ctl.result(req)

    @worker_api.post("/locate", response_model=S.LocateResponse)
    async def w_locate(req: S.LocateRequest) -> S.LocateResponse:
        return ctl.locate(req)

    roles: dict[tuple[str, str], str | None] = {}
    for role, routes in ((None, public), ("read", read_api), ("admin", api), ("worker", worker_api)):
        app.include_router(routes)
        roles.update({(method, route.path): role for route in routes.routes if isinstance(route, APIRoute)
                      for method in route.methods or ()})
    for route in app.routes:  # the OpenAPI document and its viewers
        if not isinstance(route, APIRoute):
            roles.update({(method, getattr(route, "path", "")): None for method in getattr(route, "methods", ())})
    app.add_middleware(Gate, auth=bearer_auth(settings), roles=roles, limit=settings.max_body_bytes,
                       on_refusal=lambda reason: ctl.metrics.count(f"refused_{reason}"))
    return app


def serve(settings: ControllerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Run the controller until SIGINT / SIGTERM (blocking)."""
    settings.check()
    if settings.token and not settings.worker_token:
        log.warning("workers present the admin token; give them their own with --worker-token")
    serve_http(create_app(settings), settings.host, settings.port, on_ready)
