"""Network helpers shared by every kvtier listener (cache server, controller, router, P2P, metrics):
loopback checks, bearer tokens and roles, the ASGI gate, URL redaction, listening sockets and serving.

Invariants:
- :func:`is_loopback` is true only if *every* address a host name resolves to is a loopback address;
  an empty or unresolvable host is not loopback. Listeners refuse a non-loopback bind without a token.
- Tokens are compared only by :func:`token_matches` (constant time in the presented token's content,
  and an empty expected token never matches anything).
- :class:`Gate` decides a request from its headers alone: the bearer token (and the role it grants)
  and the declared length are checked *before* the application reads a byte of the body, and a body
  sent without a length (chunked) is cut off as soon as it passes the cap.
- :func:`redact_url` is the only form in which a URL that may carry credentials is shown (logs, error
  bodies, metrics labels, response headers).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kvtier.errors import ConfigError

ANY_ROLE = "*"  # a route that any valid token may call (but not an anonymous client)


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def token_matches(presented: str | bytes, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one ('' never matches)."""
    if not expected:
        return False
    given = presented if isinstance(presented, bytes) else presented.encode()
    return hmac.compare_digest(given, expected.encode())


def bearer(authorization: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (None if absent or another scheme)."""
    if authorization is None:
        return None
    text = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (the form safe to log or show)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


class BearerAuth:
    """Bearer tokens and the roles each grants. With no token at all every request has every role
    (listeners allow that only on loopback)."""

    def __init__(self, grants: Mapping[str, frozenset[str]]) -> None:
        self.grants = {token: roles for token, roles in grants.items() if token}

    @property
    def open(self) -> bool:
        return not self.grants

    def roles(self, token: str) -> frozenset[str]:
        """Roles ``token`` grants (empty: no such token); every configured token is compared."""
        granted: frozenset[str] = frozenset()
        for expected, roles in self.grants.items():
            if token_matches(token, expected):
                granted = granted | roles
        return granted


Refusal = Callable[[int, str], tuple[bytes, list[tuple[bytes, bytes]]]]


def json_detail(status: int, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Default refusal body: ``{"detail": message}``."""
    return json.dumps({"detail": message}).encode(), []


class Gate:
    """ASGI middleware: authentication, authorisation and the body cap, decided before the body is read.

    ``roles`` maps ``(METHOD, path)`` to the role a route needs (None: public; :data:`ANY_ROLE`: any valid
    token); unlisted routes need :data:`ANY_ROLE`. ``refuse`` renders an error body in the
    application's own format; ``on_refusal`` is told the reason (``auth`` or ``body``) for metrics.
    """

    def __init__(self, app: Any, *, auth: BearerAuth, roles: Mapping[tuple[str, str], str | None], limit: int,
                 refuse: Refusal = json_detail, on_refusal: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.auth = auth
        self.roles = dict(roles)
        self.limit = limit
        self.refuse = refuse
        self.on_refusal = on_refusal or (lambda _reason: None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        denied = self._authorise(scope, headers)
        if denied is not None:
            self.on_refusal("auth")
            await self._send(send, *denied)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            self.on_refusal("body")
            await self._send(send, 413, f"request body exceeds {self.limit} bytes")
            return
        seen, started, refused = 0, False, False

        async def limited() -> Any:
            # past the cap: answer 413 ourselves, and the application sees a client that went away
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen <= self.limit:
                return message
            refused = True
            self.on_refusal("body")
            if not started:
                await self._send(send, 413, f"request body exceeds {self.limit} bytes")
            return {"type": "http.disconnect"}

        async def guarded(message: Any) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        await self.app(scope, limited, guarded)

    def _authorise(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """None if the request may proceed, else (status, message)."""
        if self.auth.open:
            return None
        need = self.roles.get((scope["method"], scope["path"]), ANY_ROLE)
        if need is None:
            return None
        token = bearer(headers.get(b"authorization"))
        if token is None:
            return 401, "this route requires 'Authorization: Bearer <token>'"
        granted = self.auth.roles(token)
        if not granted:
            return 403, "wrong token"
        if need != ANY_ROLE and need not in granted:
            return 403, f"this token does not grant the {need!r} role that {scope['path']} needs"
        return None

    async def _send(self, send: Any, status: int, message: str) -> None:
        body, extra = self.refuse(status, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *extra]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one)."""
    family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def serve_http(app: Any, host: str, port: int, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve the ASGI ``app`` on ``host:port`` with uvicorn until SIGINT / SIGTERM (blocking); ``on_ready``
    gets the bound port (useful with port 0) once the socket listens."""
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30,
                            timeout_graceful_shutdown=5)
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    uvicorn.Server(config).run(sockets=[sock])
