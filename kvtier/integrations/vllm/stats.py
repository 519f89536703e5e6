"""kvtier's numbers inside vLLM's own ``/metrics``, through vLLM's connector-stats mechanism.

vLLM 0.32 moves connector stats like this: after every step the worker-side connector returns a
:class:`KVConnectorStats` (``get_kv_connector_stats``); vLLM aggregates those of all workers, sends
``stats.data`` (plain msgspec-encodable values) to the API server, rebuilds them there with the
connector class's ``build_kv_connector_stats`` and hands them to the ``KVConnectorPromMetrics`` that
``build_prom_metrics`` registered in vLLM's Prometheus registry. So kvtier's metrics appear on the
engine's own endpoint, labelled with vLLM's ``model_name`` and ``engine`` labels.

What is reported (counter names as in :mod:`kvtier.metrics`, so one dashboard reads both):

- engine counters: ``kvtier_requests{op}``, ``kvtier_lookup_tokens{result}``,
  ``kvtier_retrieve_tokens{result}``, ``kvtier_stored_tokens``, ``kvtier_promoted_chunks``;
- lower tiers: ``kvtier_tier_reads{tier,result}``, ``kvtier_tier_writes{tier,result}``,
  ``kvtier_tier_bytes{tier,direction}``, ``kvtier_tier_errors{tier}``;
- the connector: ``kvtier_connector_tokens{op}``, ``kvtier_connector_bytes{op}`` (bytes moved between
  vLLM's paged cache and kvtier's CPU tier), ``kvtier_connector_failures{op}``, and the latency
  histogram ``kvtier_connector_seconds{op}`` (``op`` = load / save);
- gauges: ``kvtier_cpu_used_bytes``, ``kvtier_cpu_chunks``, ``kvtier_store_queue_depth``.

Invariant: a worker reports each increment once — :class:`StatsTracker` sends the difference to its
previous snapshot — so vLLM's sum over steps and workers is kvtier's own total. The scheduler side
reports nothing (with an in-process worker it shares the engine, which would count twice).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from kvtier.metrics import LATENCY_BUCKETS, TIER_BYTES, TIER_READS, TIER_WRITES

SEP = "|"  # joins a family name and its label values into one msgspec-friendly string key
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kvtier_requests": ("kvtier engine calls by operation.", ("op",)),
    "kvtier_lookup_tokens": ("Tokens asked for in kvtier lookups, by result.", ("result",)),
    "kvtier_retrieve_tokens": ("Tokens asked for in kvtier retrieves, by result.", ("result",)),
    "kvtier_stored_tokens": ("Tokens copied into kvtier's CPU tier.", ()),
    "kvtier_promoted_chunks": ("Chunks promoted from a lower tier to kvtier's CPU tier.", ()),
    "kvtier_tier_reads": ("kvtier lower-tier reads by result.", ("tier", "result")),
    "kvtier_tier_writes": ("kvtier lower-tier writes by result.", ("tier", "result")),
    "kvtier_tier_bytes": ("Bytes kvtier moved to and from its lower tiers.", ("tier", "direction")),
    "kvtier_tier_errors": ("Failed kvtier lower-tier calls.", ("tier",)),
    "kvtier_connector_tokens": ("Tokens the kvtier connector loaded into / saved from vLLM.", ("op",)),
    "kvtier_connector_bytes": ("Bytes the kvtier connector moved between vLLM and kvtier.", ("op",)),
    "kvtier_connector_failures": ("kvtier loads (recomputed by vLLM) and saves that failed.", ("op",)),
}
GAUGES: dict[str, str] = {
    "kvtier_cpu_used_bytes": "Bytes of kvtier CPU-tier slots in use.",
    "kvtier_cpu_chunks": "Chunks in kvtier's CPU tier.",
    "kvtier_store_queue_depth": "Chunk writes queued for kvtier's lower tiers.",
}
SECONDS = ("kvtier_connector_seconds", "Time the kvtier connector spent per load / save.", ("op",))
_ENGINE_SECTIONS = ("engine", "cpu", "manager")


def key(family: str, *labels: str) -> str:
    return SEP.join((family, *labels))


def engine_samples(stats: Mapping[str, Mapping[str, Any]], connector: Mapping[str, int | float],
                   token_bytes: int) -> tuple[dict[str, float], dict[str, float]]:
    """Cumulative ``(counters, gauges)`` keyed by :func:`key`, from ``engine.stats()`` and the
    connector's own counters (``loaded_tokens``, ``saved_tokens``, ``load_failures``, ``save_failures``)."""
    engine, cpu, manager = (stats.get(s, {}) for s in _ENGINE_SECTIONS)
    c: dict[str, float] = {}

    def num(values: Mapping[str, Any], name: str) -> float:
        value = values.get(name, 0)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

    for op, name in (("lookup", "lookups"), ("store", "stores"), ("retrieve", "retrieves")):
        c[key("kvtier_requests", op)] = num(engine, name)
    for op in ("lookup", "retrieve"):
        total, hit = num(engine, f"{op}_tokens"), num(engine, f"{op}_hit_tokens")
        c[key(f"kvtier_{op}_tokens", "hit")] = hit
        c[key(f"kvtier_{op}_tokens", "miss")] = max(0.0, total - hit)
    c[key("kvtier_stored_tokens")] = num(engine, "stored_tokens")
    c[key("kvtier_promoted_chunks")] = num(engine, "promoted_chunks")
    for tier, values in stats.items():
        if tier in _ENGINE_SECTIONS or "healthy" not in values:
            continue
        for family, table in (("kvtier_tier_reads", TIER_READS), ("kvtier_tier_writes", TIER_WRITES),
                              ("kvtier_tier_bytes", TIER_BYTES)):
            for name, label in table.items():
                c[key(family, tier, label)] = num(values, name)
        c[key("kvtier_tier_errors", tier)] = num(values, "errors")
    for op in ("load", "save"):
        tokens = num(connector, f"{'loaded' if op == 'load' else 'saved'}_tokens")
        c[key("kvtier_connector_tokens", op)] = tokens
        c[key("kvtier_connector_bytes", op)] = tokens * token_bytes
        c[key("kvtier_connector_failures", op)] = num(connector, f"{op}_failures")
    gauges = {key("kvtier_cpu_used_bytes"): num(cpu, "used_bytes"), key("kvtier_cpu_chunks"): num(cpu, "chunks"),
              key("kvtier_store_queue_depth"): num(manager, "queue_depth")}
    return c, gauges


class KvtierConnectorStats(KVConnectorStats):
    """``data`` = ``{"counters": {key: increment}, "gauges": {key: value}, "seconds": {op: [s, ...]}}``."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data: dict[str, Any] = {"counters": {}, "gauges": {}, "seconds": {}}

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | None) -> KvtierConnectorStats:
        """Rebuild from a shipped ``data`` payload, sharing no mutable part with it (vLLM hands the same
        payload to its log and Prometheus loggers; aggregating must not change what the other sees)."""
        data = data or {}
        return cls(data={"counters": dict(data.get("counters") or {}), "gauges": dict(data.get("gauges") or {}),
                         "seconds": {op: list(v) for op, v in (data.get("seconds") or {}).items()}})

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Sum counters, keep the latest gauges (one rank's view: a gauge summed over steps means
        nothing), join latencies."""
        data: dict[str, Any] = other.data or {}
        counters = self.data.setdefault("counters", {})
        for name, value in (data.get("counters") or {}).items():
            counters[name] = counters.get(name, 0.0) + value
        self.data.setdefault("gauges", {}).update(data.get("gauges") or {})
        seconds = self.data.setdefault("seconds", {})
        for op, values in (data.get("seconds") or {}).items():
            seconds.setdefault(op, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        """A short summary for vLLM's periodic log line."""
        counters = self.data.get("counters", {})
        out: dict[str, int | float] = {}
        for name in ("kvtier_connector_tokens", "kvtier_connector_failures"):
            for op in ("load", "save"):
                value = counters.get(key(name, op), 0.0)
                if value:
                    out[f"{name.removeprefix('kvtier_connector_')}_{op}"] = int(value)
        for op, values in self.data.get("seconds", {}).items():
            if values:
                out[f"{op}_ms_avg"] = round(1e3 * sum(values) / len(values), 2)
        return out

    def is_empty(self) -> bool:
        return not (self.data.get("counters") or self.data.get("seconds"))


class StatsTracker:
    """Worker side: turns cumulative samples into the increments of one :class:`KvtierConnectorStats`."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._seconds: dict[str, list[float]] = {}
        self._lock = threading.Lock()  # the asynchronous loader times its loads from its own thread

    def time(self, op: str, seconds: float) -> None:
        with self._lock:
            self._seconds.setdefault(op, []).append(seconds)

    def take(self, counters: Mapping[str, float], gauges: Mapping[str, float]) -> KvtierConnectorStats | None:
        """The increments since the last call (None when nothing changed)."""
        delta = {name: value - self._last.get(name, 0.0) for name, value in counters.items()
                 if value != self._last.get(name, 0.0)}
        self._last.update(counters)
        with self._lock:
            seconds, self._seconds = self._seconds, {}
        if not delta and not seconds:
            return None
        return KvtierConnectorStats(data={"counters": delta, "gauges": dict(gauges), "seconds": seconds})


def _unregister_kvtier_families() -> None:
    """Drop kvtier families left in the global registry by an earlier vLLM engine of this process (as
    vLLM does for its own ``vllm:`` families before registering them again)."""
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        if str(getattr(collector, "_name", "")).startswith("kvtier_"):
            REGISTRY.unregister(collector)


class KvtierPromMetrics(KVConnectorPromMetrics):
    """Registers kvtier's families in vLLM's registry (vLLM's labels first) and feeds them."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_kvtier_families()
        names = list(labelnames)
        self._counters = {name: self._counter_cls(name=name, documentation=doc, labelnames=names + list(labels))
                          for name, (doc, labels) in COUNTERS.items()}
        self._gauges = {name: self._gauge_cls(name=name, documentation=doc, labelnames=names,
                                              multiprocess_mode="mostrecent")
                        for name, doc in GAUGES.items()}
        family, doc, labels = SECONDS
        self._seconds = self._histogram_cls(name=family, documentation=doc, labelnames=names + list(labels),
                                            buckets=list(LATENCY_BUCKETS))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for name, value in (transfer_stats_data.get("counters") or {}).items():
            family, *labels = name.split(SEP)
            counter = self._counters.get(family)
            if counter is not None and value > 0:
                counter.labels(*engine, *labels).inc(value)
        for name, value in (transfer_stats_data.get("gauges") or {}).items():
            gauge = self._gauges.get(name.split(SEP)[0])
            if gauge is not None:
                gauge.labels(*engine).set(value)
        for op, values in (transfer_stats_data.get("seconds") or {}).items():
            for seconds in values:
                self._seconds.labels(*engine, op).observe(seconds)
