"""Backends, their health and load, and the choice of one backend per request.

Invariants:
- ``inflight`` counts requests forwarded to a backend whose response has not finished (streamed to the
  end, failed or been cancelled); every :meth:`Pool.acquire` is matched by exactly one release.
- A backend that failed at the transport level is out of rotation for a backoff that doubles with each
  consecutive failure (``base_backoff_s`` up to ``max_backoff_s``); one success resets it. After the
  backoff it gets requests again (the next request is its probe).
- :func:`Chooser.pick` only returns a backend of the candidates it is given, and given the same state it
  is deterministic (ties rotate with a counter, so equal backends share the load).
"""

from __future__ import annotations

import itertools
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvtier.backoff import Backoff
from kvtier.config import RoutingPolicy
from kvtier.net import redact_url

POLICIES: tuple[RoutingPolicy, ...] = typing.get_args(RoutingPolicy)


@dataclass
class Backend:
    """One upstream OpenAI-compatible server (a vLLM instance), optionally known to the controller as
    ``instance_id``. ``url`` may carry credentials and is used only to send requests; ``label`` (the URL
    without them) is what logs, metrics and errors show, and ``name`` (the instance id, else the role and
    position) is the opaque id a client may be told."""

    url: str
    instance_id: str = ""
    name: str = ""
    label: str = field(init=False)
    inflight: int = 0
    backoff: Backoff = field(init=False, repr=False)  # consecutive transport failures; set by its Pool

    def __post_init__(self) -> None:
        self.label = redact_url(self.url)
        self.name = self.instance_id or self.name

    def healthy(self, now: float) -> bool:
        return self.backoff.ready(now)


class Pool:
    """The backends of one role (all of them, or the decoders / the prefillers in disaggregated mode)."""

    def __init__(self, backends: Sequence[Backend], base_backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        if not backends:
            raise ValueError("a pool needs at least one backend")
        self.backends = list(backends)
        for backend in self.backends:
            backend.backoff = Backoff(base_backoff_s, max_backoff_s)
        self._by_instance = {b.instance_id: b for b in self.backends if b.instance_id}

    def by_instance(self, instance_id: str) -> Backend | None:
        return self._by_instance.get(instance_id)

    def eligible(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Backend]:
        """Healthy backends whose URL is not in ``exclude``, in configuration order."""
        now = time.monotonic()
        return [b for b in self.backends if b.url not in exclude and b.healthy(now)]

    def acquire(self, backend: Backend) -> None:
        backend.inflight += 1

    def release(self, backend: Backend) -> None:
        backend.inflight -= 1

    def failed(self, backend: Backend) -> float:
        """Take ``backend`` out of rotation; return the backoff in seconds."""
        return backend.backoff.failed()

    def succeeded(self, backend: Backend) -> None:
        backend.backoff.succeeded()


class Decision(NamedTuple):
    backend: Backend
    reason: str  # roundrobin | least_loaded | miss | untokenized | <source>_hit (controller_hit, table_hit)
    hit_tokens: int


class Chooser:
    """Picks a backend for a request under one policy.

    ``kv``: the candidate with the most cached prefix tokens (``hits``); among equal hits, and when
    nothing is cached, the least loaded. ``least_loaded``: fewest in-flight requests. ``roundrobin``:
    the next candidate in turn. Ties in load rotate.
    """

    def __init__(self, policy: RoutingPolicy) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self._turn = itertools.count()

    def _least_loaded(self, candidates: Sequence[Backend]) -> Backend:
        start = next(self._turn) % len(candidates)
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=lambda b: b.inflight)

    def pick(self, candidates: Sequence[Backend], hits: Mapping[str, int] | None = None,
             source: str = "controller") -> Decision:
        """``hits`` maps backend URL to cached prefix tokens (``None``: the prompt's tokens are unknown);
        ``source`` names where ``hits`` came from (it becomes the decision's reason)."""
        if not candidates:
            raise ValueError("no candidate backends")
        if self.policy == "roundrobin":
            return Decision(candidates[next(self._turn) % len(candidates)], "roundrobin", 0)
        if self.policy == "least_loaded":
            return Decision(self._least_loaded(candidates), "least_loaded", 0)
        if hits is None:
            return Decision(self._least_loaded(candidates), "untokenized", 0)
        best = max((hits.get(b.url, 0) for b in candidates), default=0)
        if best <= 0:
            return Decision(self._least_loaded(candidates), "miss", 0)
        holders = [b for b in candidates if hits.get(b.url, 0) == best]
        return Decision(self._least_loaded(holders), f"{source}_hit", best)
