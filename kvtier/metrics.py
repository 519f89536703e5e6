"""Prometheus metrics of kvtier processes, each in its own :class:`CollectorRegistry` (never the global
one, so several engines in one process, as in tests, do not collide).

- :class:`EngineMetrics`: one :class:`~kvtier.engine.CacheEngine`. Counters and gauges are read from
  ``engine.stats()`` at scrape time (so they can never drift from what the engine reports); latency
  histograms are fed by the engine's and the storage manager's ``observers`` hooks.
- :class:`ControllerMetrics`: the cluster controller (instances, index size, events, operations, HTTP).

Label names never collide with the labels Prometheus attaches to every scraped target (``instance``,
``job``): a kvtier instance is ``kvtier_instance``.

Logging: :func:`configure_logging` makes the ``kvtier`` logger follow a host's logger (vLLM's, SGLang's)
in level and handlers; ``KVTIER_LOG_LEVEL`` overrides the level.

Exposition: :meth:`EngineMetrics.serve` starts an opt-in HTTP endpoint bound to 127.0.0.1 unless told
otherwise (the metrics carry no KV, but do reveal load and model names). This module imports neither
torch nor the engine.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.errors import ConfigError
from kvtier.net import is_loopback

# a kvtier instance id as a label; never ``instance`` or ``job``, which Prometheus sets on every target
# (a clash renames ours to ``exported_instance``)
INSTANCE_LABEL = "kvtier_instance"
LATENCY_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
Stats = Mapping[str, Mapping[str, Any]]

# manager per-tier counter -> (family, label value); see kvtier.storage.manager
TIER_READS = {"hits": "hit", "misses": "miss", "corrupt": "corrupt"}
TIER_WRITES = {"writes": "ok", "writes_failed": "failed", "writes_skipped_unhealthy": "skipped_unhealthy"}
TIER_BYTES = {"bytes_read": "read", "bytes_written": "written"}
_ENGINE_SECTIONS = ("engine", "cpu", "manager")
# metrics of one number each: (kind, name, doc, section of engine.stats(), key in it)
_SINGLE: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, str, str], ...] = (
    (CounterMetricFamily, "kvtier_stored_tokens", "Tokens copied into the CPU tier.", "engine", "stored_tokens"),
    (CounterMetricFamily, "kvtier_store_refused_tokens", "Tokens a store could not cache (all slots busy).",
     "engine", "store_refused_tokens"),
    (CounterMetricFamily, "kvtier_promoted_chunks", "Chunks promoted from a lower tier to CPU.",
     "engine", "promoted_chunks"),
    (GaugeMetricFamily, "kvtier_cpu_chunks", "Chunks in the CPU tier.", "cpu", "chunks"),
    (GaugeMetricFamily, "kvtier_cpu_used_bytes", "Bytes of CPU slots in use.", "cpu", "used_bytes"),
    (GaugeMetricFamily, "kvtier_cpu_capacity_bytes", "Bytes of the CPU arena.", "cpu", "capacity_bytes"),
    (CounterMetricFamily, "kvtier_cpu_store_refused", "CPU reservations refused because every slot was busy.",
     "cpu", "store_refused_all_busy"),
    (GaugeMetricFamily, "kvtier_store_queue_depth", "Chunk writes queued for the lower tiers.",
     "manager", "queue_depth"),
    (CounterMetricFamily, "kvtier_writes_dropped", "Lower-tier writes dropped because the queue was full.",
     "manager", "writes_dropped_queue_full"),
)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _StatsCollector(Collector):
    """Turns ``engine.stats()`` (plus extra sections) into metric families at scrape time."""

    def __init__(self, sources: list[Callable[[], Stats]]) -> None:
        self.sources = sources

    def _stats(self) -> dict[str, Mapping[str, Any]]:
        merged: dict[str, Mapping[str, Any]] = {}
        for source in self.sources:
            try:
                merged.update(source())
            except Exception:  # a scrape must never fail because one source did
                continue
        return merged

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        sections = {name: stats.get(name, {}) for name in _ENGINE_SECTIONS}
        engine, cpu = sections["engine"], sections["cpu"]
        used: set[tuple[str, str]] = set()

        def get(section: str, values: Mapping[str, Any], key: str) -> float:
            used.add((section, key))
            return _num(values.get(key)) or 0.0

        requests = CounterMetricFamily("kvtier_requests", "Engine calls by operation.", labels=["op"])
        for op, key in (("lookup", "lookups"), ("store", "stores"), ("retrieve", "retrieves")):
            requests.add_metric([op], get("engine", engine, key))
        yield requests
        for op in ("lookup", "retrieve"):
            fam = CounterMetricFamily(f"kvtier_{op}_tokens", f"Tokens asked for in {op} calls, by result.",
                                      labels=["result"])
            total, hit = get("engine", engine, f"{op}_tokens"), get("engine", engine, f"{op}_hit_tokens")
            fam.add_metric(["hit"], hit)
            fam.add_metric(["miss"], max(0.0, total - hit))
            yield fam
        for kind, name, doc, section, key in _SINGLE:
            yield kind(name, doc, value=get(section, sections[section], key))

        evictions = CounterMetricFamily("kvtier_evictions", "Chunks evicted, by tier.", labels=["tier"])
        evictions.add_metric(["cpu"], get("cpu", cpu, "evictions"))
        collisions = CounterMetricFamily("kvtier_collisions", "Key hits rejected by the token check, by tier.",
                                         labels=["tier"])
        collisions.add_metric(["cpu"], get("cpu", cpu, "collisions"))
        reads = CounterMetricFamily("kvtier_tier_reads", "Lower-tier reads by result.", labels=["tier", "result"])
        writes = CounterMetricFamily("kvtier_tier_writes", "Lower-tier writes by result.", labels=["tier", "result"])
        nbytes = CounterMetricFamily("kvtier_tier_bytes", "Bytes moved to and from lower tiers.",
                                     labels=["tier", "direction"])
        errors = CounterMetricFamily("kvtier_tier_errors", "Failed lower-tier calls.", labels=["tier"])
        reconnects = CounterMetricFamily("kvtier_tier_reconnects", "Lower tiers back after failing.", labels=["tier"])
        healthy = GaugeMetricFamily("kvtier_tier_healthy", "1 while the tier answers, 0 while backing off.",
                                    labels=["tier"])
        for tier, values in stats.items():
            if tier in _ENGINE_SECTIONS or "healthy" not in values:
                continue
            for table, family in ((TIER_READS, reads), (TIER_WRITES, writes), (TIER_BYTES, nbytes)):
                for key, label in table.items():
                    family.add_metric([tier, label], get(tier, values, key))
            errors.add_metric([tier], get(tier, values, "errors"))
            collisions.add_metric([tier], get(tier, values, "collisions"))
            reconnects.add_metric([tier], get(tier, values, "reconnects"))
            healthy.add_metric([tier], get(tier, values, "healthy"))
            if "evictions" in values:
                evictions.add_metric([tier], get(tier, values, "evictions"))
        yield from (evictions, collisions, reads, writes, nbytes, errors, reconnects, healthy)

        other = GaugeMetricFamily("kvtier_stat", "Any other number a component reports (section, name).",
                                  labels=["section", "name"])
        for section, values in stats.items():
            for key, value in values.items():
                number = _num(value)
                if number is not None and (section, key) not in used:
                    other.add_metric([section, key], number)
        yield other


class EngineMetrics:
    """Metrics of one engine. ``sources`` add sections (e.g. ``agent.stats``) to ``engine.stats()``."""

    def __init__(self, engine: Any, *, sources: list[Callable[[], Stats]] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry if registry is not None else CollectorRegistry()
        self.op_seconds = Histogram("kvtier_operation_seconds", "Latency of engine calls.", ["op"],
                                    registry=self.registry, buckets=LATENCY_BUCKETS)
        self.tier_seconds = Histogram("kvtier_tier_operation_seconds", "Latency of lower-tier calls.",
                                      ["tier", "op", "outcome"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.registry.register(_StatsCollector([engine.stats, *(sources or [])]))
        engine.observers.append(self._on_engine)
        engine.storage.observers.append(self._on_tier)
        self._server: Any = None

    def _on_engine(self, op: str, seconds: float) -> None:
        self.op_seconds.labels(op).observe(seconds)

    def _on_tier(self, tier: str, op: str, seconds: float, ok: bool) -> None:
        self.tier_seconds.labels(tier, op, "ok" if ok else "error").observe(seconds)

    def render(self) -> bytes:
        """The exposition text (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int = 0, host: str = "127.0.0.1", *, allow_remote: bool = False) -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; return the port. A non-loopback ``host``
        needs ``allow_remote`` (the endpoint has no authentication)."""
        check_metrics_host(host, allow_remote)
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop the endpoint and unhook from the engine."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for hooks, fn in ((self.engine.observers, self._on_engine), (self.engine.storage.observers, self._on_tier)):
            if fn in hooks:
                hooks.remove(fn)


def check_metrics_host(host: str, allow_remote: bool) -> None:
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(f"metrics host {host!r} is not loopback; the endpoint is unauthenticated: pass "
                          "allow_remote=True (and firewall it) or bind 127.0.0.1")


class ControllerMetrics:
    """Controller metrics; gauges read the controller's state at scrape time."""

    def __init__(self, controller: Any) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("kvtier_controller_events", "Worker-channel events by kind.", ["kind"],
                              registry=self.registry)
        self.http_requests = Counter("kvtier_controller_http_requests", "HTTP requests.",
                                     ["route", "method", "code"], registry=self.registry)
        self.lookup_seconds = Histogram("kvtier_controller_lookup_seconds", "Latency of /lookup.",
                                        registry=self.registry, buckets=LATENCY_BUCKETS)
        self.registry.register(_ControllerCollector(controller))

    def count(self, kind: str, n: int = 1) -> None:
        self.events.labels(re.sub(r"[^a-z0-9_]", "_", kind.lower())).inc(n)

    def http(self, route: str, method: str, code: int) -> None:
        self.http_requests.labels(route, method, str(code)).inc()

    def observe_lookup(self, seconds: float) -> None:
        self.lookup_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ControllerCollector(Collector):
    def __init__(self, controller: Any) -> None:
        self.ctl = controller

    def collect(self) -> Iterator[Metric]:
        ctl = self.ctl
        yield GaugeMetricFamily("kvtier_controller_instances", "Live registered instances.", value=len(ctl.workers))
        yield GaugeMetricFamily("kvtier_controller_index_keys", "Distinct chunk keys in the index.",
                                value=len(ctl.index))
        yield GaugeMetricFamily("kvtier_controller_index_entries", "(instance, tier, key) entries in the index.",
                                value=ctl.index.total)
        yield CounterMetricFamily("kvtier_controller_index_admits_dropped",
                                  "Admits dropped because the index was at its cap.",
                                  value=ctl.index.counters["admits_dropped"])
        keys = GaugeMetricFamily("kvtier_controller_instance_keys", "Keys per instance and tier.",
                                 labels=[INSTANCE_LABEL, "tier"])
        queued = GaugeMetricFamily("kvtier_controller_command_queue_depth", "Commands waiting for a worker.",
                                   labels=[INSTANCE_LABEL])
        for inst, worker in list(ctl.workers.items()):
            for tier, n in ctl.index.counts(inst).items():
                keys.add_metric([inst, tier], n)
            queued.add_metric([inst], worker.queue.qsize())
        yield keys
        yield queued
        ops = GaugeMetricFamily("kvtier_controller_operations", "Operations kept, by status.", labels=["status"])
        by_status: dict[str, int] = {}
        for op in list(ctl.ops.values()):
            by_status[op.status] = by_status.get(op.status, 0) + 1
        for status in ("pending", "running", "done", "failed"):
            ops.add_metric([status], by_status.get(status, 0))
        yield ops


LOG_LEVEL_ENV = "KVTIER_LOG_LEVEL"
_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def configure_logging(follow: logging.Logger | None = None) -> int:
    """Set the ``kvtier`` logger's level and return it: ``$KVTIER_LOG_LEVEL`` when set (a level name,
    any case, or a number), else ``follow``'s effective level (the engine's), else left as is. When
    ``follow`` has handlers and ``kvtier`` has none, kvtier's records go through ``follow``'s handlers
    (so they land where the engine's own lines do, in its format) and stop propagating to the root
    logger. Idempotent. Raise :class:`ConfigError` naming a bad ``KVTIER_LOG_LEVEL`` value."""
    logger = logging.getLogger("kvtier")
    raw = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if raw:
        if raw.isdigit():
            level = int(raw)
        elif raw.upper() in _LEVELS:
            level = int(getattr(logging, raw.upper()))
        else:
            raise ConfigError(f"{LOG_LEVEL_ENV}={raw!r} is not a log level; expected one of {_LEVELS} or a number")
    elif follow is not None:
        level = follow.getEffectiveLevel()
    else:
        return logger.getEffectiveLevel()
    logger.setLevel(level)
    if follow is not None and follow.handlers and not logger.handlers:
        for handler in follow.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    return level
