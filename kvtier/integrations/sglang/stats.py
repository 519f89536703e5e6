"""The SGLang backend's I/O records, handed to SGLang as its own ``StorageMetrics`` by ``get_stats()``.

SGLang (0.5.23, with ``--enable-metrics``) calls the storage backend's ``get_stats()`` once per
scheduler check and feeds the result to its ``StorageMetricsCollector``, which asserts the type is
``sglang.srt.observability.metrics_collector.StorageMetrics`` and observes each list element into a
histogram of SGLang's own ``/metrics``: ``sglang:prefetch_pgs`` / ``sglang:backup_pgs`` (pages per
operation) and ``sglang:prefetch_bandwidth`` / ``sglang:backup_bandwidth`` (GB/s per operation).
A "prefetch" is a read from kvtier's tiers into SGLang's host pool, a "backup" a write into them.

Invariants: each record is drained exactly once (``drain`` empties what it returns); at most
``max_records`` of each kind are held (the oldest are dropped when nobody drains, e.g. metrics off);
operations that moved no page are not recorded. Thread-safe.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["IoStats", "storage_metrics_type"]

Kind = Literal["prefetch", "backup"]


@dataclass
class _StandInMetrics:
    """SGLang's ``StorageMetrics`` fields, used where SGLang is not installed (unit tests)."""

    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)
    backup_bandwidth: list[float] = field(default_factory=list)


def storage_metrics_type() -> type[Any]:
    """SGLang's ``StorageMetrics`` class, or a stand-in with the same fields without SGLang."""
    try:
        from sglang.srt.observability.metrics_collector import StorageMetrics
    except ImportError:
        return _StandInMetrics
    return StorageMetrics


class IoStats:
    """Pages and GB/s of each read ("prefetch") and write ("backup") since the last :meth:`drain`."""

    def __init__(self, max_records: int = 4096) -> None:
        self._lock = threading.Lock()
        self._records: dict[Kind, collections.deque[tuple[int, float]]] = {
            "prefetch": collections.deque(maxlen=max_records), "backup": collections.deque(maxlen=max_records)}

    def record(self, kind: Kind, pages: int, nbytes: int, seconds: float) -> None:
        """One operation of ``kind`` moved ``pages`` pages (``nbytes`` bytes) in ``seconds``."""
        if pages <= 0:
            return
        gbps = nbytes / max(seconds, 1e-9) / 1e9
        with self._lock:
            self._records[kind].append((pages, gbps))

    def drain(self) -> Any:
        """Everything recorded since the last call, as SGLang's ``StorageMetrics``; empties the records."""
        metrics = storage_metrics_type()()
        with self._lock:
            for kind, records in self._records.items():
                getattr(metrics, f"{kind}_pgs").extend(pages for pages, _ in records)
                getattr(metrics, f"{kind}_bandwidth").extend(gbps for _, gbps in records)
                records.clear()
        return metrics
