"""The HTTP side of ``kvtier router``: OpenAI-compatible routes proxied to the chosen backend.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (routed), ``GET /v1/models`` (any healthy
backend), ``GET /health`` (public: 200 while some backend is in rotation, else 503), ``GET /metrics``.

Invariants:
- Binds 127.0.0.1 by default; a non-loopback address needs a token, and with a token every route but
  ``/health`` needs ``Authorization: Bearer <token>`` (what OpenAI clients send as their API key),
  checked before the body is read. The router's token is never forwarded; backends get
  ``backend_token`` if one is set.
- Request bodies above ``max_body_bytes`` get 413 before they are buffered; above ``max_concurrent``
  requests in flight, new ones get 429 at once. Both bound the router's memory and upstream fan-out.
  A body that is not a JSON object (malformed, or nested too deeply to parse) gets 400.
- Clients never share state through the router: it keeps no cookies (a backend's ``Set-Cookie`` is
  neither stored nor relayed) and forwards only the body and ``content-type``.
- Backend URLs, which may carry ``user:password@``, never leave the router: logs, metrics and error
  bodies show them without credentials, and a response names its backend (``x-kvtier-backend``) only
  when ``backend_header`` is on, and then only by its opaque name (instance id, else ``decode-N``).
- A request body is forwarded byte for byte; a response is relayed chunk by chunk as the backend sends
  it (Server-Sent Events stay live). Whatever ends a relay (the end, an upstream error, the client
  disconnecting) closes the upstream response, which cancels the request in the engine, and frees the
  backend's in-flight slot exactly once.
- A transport failure before the response starts (refused, reset, connect timeout) takes the backend out
  of rotation with backoff and the request goes to another backend; with none left the answer is 502
  (backends failed now) or 503 (none in rotation), never a hang. Upstream HTTP errors are relayed as is.
- Disaggregated mode (prefill backends given): the prompt first goes to the least-loaded prefiller with
  ``max_tokens=1``, not streamed; then the original request goes to a decoder chosen by the policy. A
  failed prefill is counted and skipped: the decoder then computes the prefill itself.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.types import Receive, Scope, Send

from kvtier.config import KvtierConfig
from kvtier.net import BearerAuth, Gate, serve_http
from kvtier.router.kv import KvKnowledge
from kvtier.router.metrics import RouterMetrics
from kvtier.router.policy import Backend, Chooser, Pool
from kvtier.router.prefix import PrefixTable, table_chunk_tokens
from kvtier.router.tokens import PromptTokens

log = logging.getLogger(__name__)

_PASS_HEADERS = ("content-type", "x-request-id")


class RouterError(Exception):
    """Answered as an OpenAI-style error ``{"error": {"message", "type", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "code": self.status}},
                            status_code=self.status, headers=headers)


class Relay(StreamingResponse):
    """Streams ``upstream`` to the client; runs ``on_close`` once however the relay ends."""

    def __init__(self, upstream: httpx.Response, body: AsyncIterator[bytes], headers: dict[str, str],
                 on_close: Callable[[], None]) -> None:
        super().__init__(body, status_code=upstream.status_code, headers=headers)
        self.upstream = upstream
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            self.on_close()


@dataclass
class _Sent:
    upstream: httpx.Response
    backend: Backend
    started: float


class Router:
    """Pools, policy, prefix knowledge and the forwarding of one request. Runs on one event loop."""

    def __init__(self, config: KvtierConfig) -> None:
        self.settings = s = config.router
        self.decode = Pool([Backend(u, i, f"decode-{n}") for n, (u, i) in enumerate(s.backends)], s.backoff_s,
                           s.max_backoff_s)
        self.prefill = Pool([Backend(u, i, f"prefill-{n}") for n, (u, i) in enumerate(s.prefill)], s.backoff_s,
                            s.max_backoff_s) if s.prefill else None
        self.chooser = Chooser(s.policy)
        self.by_load = Chooser("least_loaded")
        self.metrics = RouterMetrics({"decode": self.decode, **({"prefill": self.prefill} if self.prefill else {})})
        self.client = httpx.AsyncClient(
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),  # keeps none
            timeout=httpx.Timeout(s.read_timeout_s, connect=s.connect_timeout_s, pool=s.connect_timeout_s),
            limits=httpx.Limits(max_connections=2 * s.max_concurrent, max_keepalive_connections=64))
        self.tokens = PromptTokens(s.tokenizer)
        self.kv = KvKnowledge(self.client, PrefixTable(table_chunk_tokens(config), s.table_size), self.metrics,
                              controller_url=s.controller_url, controller_token=s.controller_token,
                              timeout_s=s.lookup_timeout_s, backoff_s=s.controller_backoff_s)
        self.active = 0
        self._upstream_headers = {"Authorization": f"Bearer {s.backend_token}"} if s.backend_token else {}

    # ---- one request -----------------------------------------------------------------------------
    async def handle(self, route: str, path: str, request: Request) -> Response:
        if self.active >= self.settings.max_concurrent:
            self.metrics.rejected.labels("busy").inc()
            raise RouterError(429, f"the router has {self.active} requests in flight (max_concurrent)", 1.0)
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RouterError(400, f"request body is not JSON: {exc}") from None
            except RecursionError:
                raise RouterError(400, "request body is not JSON the router accepts: nested too deeply") from None
            if not isinstance(body, dict):
                raise RouterError(400, "request body must be a JSON object")
            tokens = await self._prompt_tokens(route, body)
            model = self.settings.kv_model or str(body.get("model", ""))
            if self.prefill is not None:
                await self._prefill(path, route, body, tokens, model)
            sent = await self._send(self.decode, "decode", self.chooser, "POST", path, raw, tokens, model)
            return self._relay(sent, "decode", route, bool(body.get("stream")), release)
        except BaseException:
            release()
            raise

    async def models(self) -> Response:
        sent = await self._send(self.decode, "decode", self.by_load, "GET", "/v1/models", b"", None, "")
        return self._relay(sent, "decode", "models", False, lambda: None)

    async def _prompt_tokens(self, route: str, body: dict[str, Any]) -> list[int] | None:
        if self.chooser.policy != "kv":
            return None
        try:
            return await self.tokens.of(route, body)
        except Exception as exc:  # a prompt we cannot tokenize is the engine's to refuse, not ours
            log.debug("cannot tokenize a %s request (%s: %s); routing by load", route, type(exc).__name__, exc)
            return None

    async def _prefill(self, path: str, route: str, body: dict[str, Any], tokens: list[int] | None,
                       model: str) -> None:
        assert self.prefill is not None
        first = {**body, "max_tokens": 1, "stream": False}
        first.pop("stream_options", None)
        if "max_completion_tokens" in first:
            first["max_completion_tokens"] = 1
        try:
            sent = await self._send(self.prefill, "prefill", self.by_load, "POST", path, json.dumps(first).encode(),
                                    tokens, model)
        except RouterError as exc:
            self.metrics.errors.labels("", "prefill_unavailable").inc()
            log.warning("no prefill (%s); the decoder computes the prompt itself", exc.message)
            return
        try:
            await sent.upstream.aread()
        except httpx.HTTPError as exc:
            self.metrics.errors.labels(sent.backend.label, "prefill_read").inc()
            log.warning("prefill on %s failed while reading (%s)", sent.backend.label, _scrub(str(exc), sent.backend))
        finally:
            await sent.upstream.aclose()
            self._finish(sent, "prefill", route)
        if sent.upstream.status_code != 200:
            self.metrics.errors.labels(sent.backend.label, "prefill_status").inc()
            log.warning("prefill on %s answered %d", sent.backend.label, sent.upstream.status_code)

    # ---- forwarding ------------------------------------------------------------------------------
    async def _send(self, pool: Pool, role: str, chooser: Chooser, method: str, path: str, content: bytes,
                    tokens: list[int] | None, model: str) -> _Sent:
        """Start the request on a backend chosen by ``chooser`` (retrying others after transport errors);
        the caller owns the returned response and must :meth:`_finish` it."""
        hits, source = None, "controller"
        if chooser.policy == "kv" and tokens is not None:
            hits, source = await self.kv.hits(model, tokens, pool)
        headers = {"content-type": "application/json", **self._upstream_headers}
        tried: set[str] = set()
        last = ""
        while True:
            candidates = pool.eligible(tried)
            if not candidates:
                if tried:
                    raise RouterError(502, f"every {role} backend failed: {last}")
                now = time.monotonic()
                wait = min(b.backoff.retry_at for b in pool.backends) - now
                raise RouterError(503, f"no {role} backend is in rotation (all failed recently)", wait)
            decision = chooser.pick(candidates, hits, source)
            backend = decision.backend
            self.metrics.decisions.labels(role, decision.reason).inc()
            pool.acquire(backend)
            started = time.perf_counter()
            try:
                request = self.client.build_request(method, backend.url + path, content=content or None,
                                                    headers=headers)
                upstream = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                pool.release(backend)
                backoff = pool.failed(backend)
                timed_out = isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout)
                self.metrics.errors.labels(backend.label, "timeout" if timed_out else "connect").inc()
                last = f"{backend.label}: {type(exc).__name__}: {_scrub(str(exc), backend)}"
                log.warning("%s backend %s failed; out of rotation for %.1fs", role, last, backoff)
                if timed_out:
                    raise RouterError(504, f"{role} backend {backend.label} did not answer in time") from None
                tried.add(backend.url)
                continue
            except BaseException:
                pool.release(backend)
                raise
            pool.succeeded(backend)
            if tokens is not None:
                self.kv.record(tokens, backend.url)
                if role == "decode":
                    self.metrics.prompt_tokens.labels("hit").inc(decision.hit_tokens)
                    self.metrics.prompt_tokens.labels("miss").inc(max(0, len(tokens) - decision.hit_tokens))
            if upstream.status_code >= 500:
                self.metrics.errors.labels(backend.label, "http_5xx").inc()
            return _Sent(upstream, backend, started)

    def _finish(self, sent: _Sent, role: str, route: str) -> None:
        pool = self.prefill if role == "prefill" and self.prefill is not None else self.decode
        pool.release(sent.backend)
        self.metrics.requests.labels(sent.backend.label, role, route, str(sent.upstream.status_code)).inc()
        self.metrics.upstream_seconds.labels(sent.backend.label, role).observe(time.perf_counter() - sent.started)

    def _relay(self, sent: _Sent, role: str, route: str, streamed: bool, release: Callable[[], None]) -> Relay:
        up = sent.upstream
        label = sent.backend.label

        async def body() -> AsyncIterator[bytes]:
            first = True
            try:
                async for chunk in up.aiter_raw():
                    if first and streamed:
                        self.metrics.ttft_seconds.labels(label).observe(time.perf_counter() - sent.started)
                    first = False
                    yield chunk
            except httpx.HTTPError as exc:  # the response is already started: end it short
                self.metrics.errors.labels(label, "stream").inc()
                log.warning("%s backend %s broke off a response (%s: %s)", role, label, type(exc).__name__,
                            _scrub(str(exc), sent.backend))

        def on_close() -> None:
            self._finish(sent, role, route)
            release()

        headers = {k: v for k in _PASS_HEADERS if (v := up.headers.get(k)) is not None}
        if self.settings.backend_header:
            headers["x-kvtier-backend"] = sent.backend.name
        return Relay(up, body(), headers, on_close)


def _scrub(text: str, backend: Backend) -> str:
    """``text`` (e.g. an httpx error quoting a URL) without ``backend``'s credentials, however the URL
    around them was rewritten."""
    userinfo = urlsplit(backend.url).netloc.rpartition("@")[0]
    return text.replace(userinfo + "@", "***@") if userinfo else text


# ---- app -------------------------------------------------------------------------------------------
def create_app(config: KvtierConfig) -> FastAPI:
    """The FastAPI app (``app.state.router`` is the :class:`Router`)."""
    router = Router(config)
    settings = config.router

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await router.client.aclose()

    app = FastAPI(title="kvtier router", version="1", lifespan=lifespan,
                  description="KV-aware OpenAI-compatible proxy in front of engine instances.")
    app.state.router = router

    @app.exception_handler(RouterError)
    async def router_error(_request: Request, exc: RouterError) -> JSONResponse:
        return exc.response()

    # Declares the bearer scheme in the OpenAPI document; the check itself is the Gate's, before the body.
    auth = [Security(HTTPBearer(auto_error=False, description="The router token (--token)."))]

    @app.post("/v1/completions", dependencies=auth, summary="Routed text completion")
    async def completions(request: Request) -> Response:
        return await router.handle("completions", "/v1/completions", request)

    @app.post("/v1/chat/completions", dependencies=auth, summary="Routed chat completion")
    async def chat(request: Request) -> Response:
        return await router.handle("chat", "/v1/chat/completions", request)

    @app.get("/v1/models", dependencies=auth, summary="Models of a healthy backend")
    async def models() -> Response:
        return await router.models()

    @app.get("/health", summary="200 while some backend is in rotation")
    async def health() -> JSONResponse:
        live = len(router.decode.eligible())
        body: dict[str, Any] = {"status": "ok" if live else "unavailable", "backends": len(router.decode.backends),
                                "healthy": live}
        if router.prefill is not None:
            body["prefill_backends"] = len(router.prefill.backends)
            body["prefill_healthy"] = len(router.prefill.eligible())
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/metrics", dependencies=auth, summary="Prometheus metrics")
    async def metrics() -> Response:
        payload, content_type = router.metrics.render()
        return Response(payload, media_type=content_type)

    public = {(method, path): None for path in ("/health", app.openapi_url or "", app.docs_url or "",
                                                 app.redoc_url or "") for method in ("GET", "HEAD")}
    app.add_middleware(Gate, auth=BearerAuth({settings.token: frozenset({"client"})}), roles=public,
                       limit=settings.max_body_bytes, refuse=_openai_error,
                       on_refusal=lambda reason: router.metrics.rejected.labels(reason).inc())
    return app


def _openai_error(status: int, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return bytes(RouterError(status, message).response().body), []


def serve(config: KvtierConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Run the router until SIGINT / SIGTERM (blocking)."""
    config.router.check()
    app = create_app(config)
    app.state.router.tokens.load()
    serve_http(app, config.router.host, config.router.port, on_ready)
