"""Prometheus metrics of ``kvtier router`` (its own registry; gauges read the pools at scrape time).

Backends are labelled by URL without credentials (:attr:`~kvtier.router.policy.Backend.label`), the role
by ``decode`` (every backend outside disaggregated mode) or ``prefill``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.metrics import LATENCY_BUCKETS
from kvtier.router.policy import Pool

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RouterMetrics:
    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("kvtier_router_requests", "Requests forwarded, by backend, role, route and "
                                "upstream status.", ["backend", "role", "route", "code"], registry=reg)
        self.decisions = Counter("kvtier_router_decisions", "Routing decisions by reason (controller_hit, "
                                 "table_hit, miss, untokenized, least_loaded, roundrobin).", ["role", "reason"],
                                 registry=reg)
        self.errors = Counter("kvtier_router_errors", "Upstream failures by backend and kind.",
                              ["backend", "kind"], registry=reg)
        self.rejected = Counter("kvtier_router_rejected", "Requests refused by the router itself, by reason.",
                                ["reason"], registry=reg)
        self.upstream_seconds = Histogram("kvtier_router_upstream_seconds", "Forward to end of the upstream "
                                          "response.", ["backend", "role"], buckets=REQUEST_BUCKETS, registry=reg)
        self.ttft_seconds = Histogram("kvtier_router_ttft_seconds", "Forward to the first body chunk of a "
                                      "streamed response.", ["backend"], buckets=REQUEST_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("kvtier_router_prompt_tokens", "Prompt tokens of routed requests, by whether "
                                  "the chosen backend was expected to hold them.", ["result"], registry=reg)
        self.lookups = Counter("kvtier_router_controller_lookups", "Controller lookups by outcome (ok, "
                               "unanswered, failed).", ["outcome"], registry=reg)
        self.lookup_seconds = Histogram("kvtier_router_controller_lookup_seconds", "Latency of controller "
                                        "lookups.", buckets=LATENCY_BUCKETS, registry=reg)
        reg.register(_PoolCollector(pools))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PoolCollector(Collector):
    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        inflight = GaugeMetricFamily("kvtier_router_inflight", "Requests in flight per backend.",
                                     labels=["backend", "role"])
        healthy = GaugeMetricFamily("kvtier_router_backend_healthy", "1 while a backend is in rotation.",
                                    labels=["backend", "role"])
        for role, pool in self.pools.items():
            for b in pool.backends:
                inflight.add_metric([b.label, role], b.inflight)
                healthy.add_metric([b.label, role], 1.0 if b.healthy(now) else 0.0)
        yield inflight
        yield healthy
