"""Where a prompt's prefix is cached: the controller's ``/lookup`` first, the router's own
:class:`~kvtier.router.prefix.PrefixTable` when the controller cannot answer.

Invariants:
- A controller lookup is bounded by ``timeout_s``; a transport error, a timeout or a 5xx puts the
  controller in backoff (``backoff_s``), during which the table answers at once, so a dead or slow
  controller costs at most one timeout per backoff period, and routing degrades but never fails.
- Controller instance ids map to backends only through :meth:`Pool.by_instance`; hits on instances the
  router does not front are ignored.
- The table also answers when the controller knows no cached prefix of the prompt on any backend (its
  index lags the engines by a report interval, so a prompt routed a moment ago may not be in it yet);
  a controller hit is never overridden by the table.
- Every routed prompt is recorded in the table, whichever source chose its backend, so the table is
  warm when the controller goes away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import httpx

from kvtier.backoff import Backoff
from kvtier.router.metrics import RouterMetrics
from kvtier.router.policy import Pool
from kvtier.router.prefix import PrefixTable

log = logging.getLogger(__name__)


class Hits(NamedTuple):
    tokens: dict[str, int]  # backend URL -> cached prefix tokens (only hits)
    source: str  # "controller" or "table"


class KvKnowledge:
    def __init__(self, client: httpx.AsyncClient, table: PrefixTable, metrics: RouterMetrics, *,
                 controller_url: str = "", controller_token: str = "", timeout_s: float = 0.25,
                 backoff_s: float = 5.0) -> None:
        self.client = client
        self.table = table
        self.metrics = metrics
        self.controller_url = controller_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {controller_token}"} if controller_token else {}
        self.timeout_s = timeout_s
        self._backoff = Backoff(backoff_s, backoff_s)  # a fixed pause after each failure

    async def hits(self, model: str, tokens: Sequence[int], pool: Pool) -> Hits:
        """Cached prefix tokens per backend of ``pool`` for ``tokens`` of ``model``."""
        answer: dict[str, int] | None = None
        if self.controller_url and self._backoff.ready(time.monotonic()):
            answer = await self._ask_controller(model, tokens, pool)
            if answer:
                return Hits(answer, "controller")
        table = self.table.match(self.table.keys(tokens), (b.url for b in pool.backends))
        if answer is not None and not table:
            return Hits(answer, "controller")
        return Hits(table, "table")

    def record(self, tokens: Sequence[int], backend: str) -> None:
        self.table.record(self.table.keys(tokens), backend)

    async def _ask_controller(self, model: str, tokens: Sequence[int], pool: Pool) -> dict[str, int] | None:
        start = time.perf_counter()
        try:
            resp = await self.client.post(f"{self.controller_url}/lookup", headers=self.headers,
                                          json={"model": model, "token_ids": list(tokens)}, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.metrics.lookup_seconds.observe(time.perf_counter() - start)
        if resp.status_code >= 500:
            self._fail(f"HTTP {resp.status_code}")
            return None
        if resp.status_code != 200:  # e.g. 404: no instance of this model registered (yet)
            self.metrics.lookups.labels("unanswered").inc()
            return None
        self.metrics.lookups.labels("ok").inc()
        self._backoff.succeeded()
        out: dict[str, int] = {}
        for instance, hit in resp.json().get("instances", {}).items():
            backend = pool.by_instance(instance)
            if backend is not None and hit.get("hit_tokens", 0) > 0:
                out[backend.url] = int(hit["hit_tokens"])
        return out

    def _fail(self, why: str) -> None:
        self.metrics.lookups.labels("failed").inc()
        pause = self._backoff.failed()
        log.warning("controller lookup failed (%s); using the router's prefix table for %.1fs", why, pause)
