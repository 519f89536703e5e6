"""Prometheus metrics of an engine (in process)."""

from __future__ import annotations

import httpx
import pytest
import torch

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.layout import KVSpec
from kvtier.metrics import EngineMetrics
from kvtier.storage.base import Tier


class DictTier(Tier):
    """A lower tier in a dict, failing on demand."""

    name = "dict"

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            from kvtier.errors import TierUnavailable

            raise TierUnavailable("down")

    def put(self, key: bytes, frame: bytes) -> None:
        self._check()
        self.data[key] = frame

    def get(self, key: bytes) -> bytes | None:
        self._check()
        return self.data.get(key)

    def exists(self, keys: list[bytes]) -> list[bool]:  # type: ignore[override]
        self._check()
        return [k in self.data for k in keys]

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def clear(self) -> int:
        n = len(self.data)
        self.data.clear()
        return n


def sample(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in metrics")


def make_engine(chunks: int, tier: Tier | None = None) -> CacheEngine:
    spec = KVSpec(2, 2, 8, "float32", chunk_tokens=16)
    cfg = load_config(environ={}, overrides={"chunk_tokens": 16, "cpu": {"capacity": chunks * spec.chunk_bytes}})
    return CacheEngine(spec, "m", cfg, tiers=[(tier, "raw")] if tier else [])


def test_counters_histograms_and_per_engine_registries() -> None:
    tier = DictTier()
    engine = make_engine(4, tier)
    other = make_engine(4)
    metrics, other_metrics = EngineMetrics(engine), EngineMetrics(other)  # separate registries: no clash
    kv = torch.randn(2, 2, 64, 2, 8)
    tokens = list(range(64))
    assert engine.store(tokens, kv) == 64  # 4 chunks fill the 4 slots; all are written below too
    assert engine.storage.flush(5)
    engine.store(list(range(1000, 1032)), kv)  # 2 more chunks evict 2
    assert engine.storage.flush(5)
    out = torch.zeros_like(kv)
    assert engine.retrieve(tokens, out) == 64  # the evicted chunks come back from the dict tier
    assert torch.equal(out, kv)
    tier.down = True
    engine.lookup(list(range(200, 232)))  # lower tier fails: an error, a miss
    text = metrics.render().decode()
    assert sample(text, "kvtier_retrieve_tokens_total", 'result="hit"') == 64
    assert sample(text, "kvtier_lookup_tokens_total", 'result="miss"') == 32
    assert sample(text, "kvtier_evictions_total", 'tier="cpu"') >= 2
    assert sample(text, "kvtier_tier_reads_total", 'result="hit",tier="dict"') >= 2
    assert sample(text, "kvtier_promoted_chunks_total") >= 2
    assert sample(text, "kvtier_tier_errors_total", 'tier="dict"') == 1
    assert sample(text, "kvtier_tier_healthy", 'tier="dict"') == 0
    assert sample(text, "kvtier_tier_bytes_total", 'direction="written",tier="dict"') > 0
    assert sample(text, "kvtier_operation_seconds_count", 'op="retrieve"') == 1
    assert sample(text, "kvtier_tier_operation_seconds_count", 'op="exists",outcome="error",tier="dict"') == 1
    assert sample(text, "kvtier_store_queue_depth") == 0
    assert sample(other_metrics.render().decode(), "kvtier_requests_total", 'op="store"') == 0
    metrics.close()
    assert metrics._on_engine not in engine.observers
    engine.close()
    other.close()


def test_endpoint_is_loopback_unless_allowed() -> None:
    engine = make_engine(2)
    metrics = EngineMetrics(engine, sources=[lambda: {"agent": {"events_sent": 3}}])
    with pytest.raises(ConfigError, match="not loopback"):
        metrics.serve(0, host="0.0.0.0")
    port = metrics.serve(0)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert sample(text, "kvtier_stat", 'name="events_sent",section="agent"') == 3
    metrics.close()
    engine.close()


def test_controller_labels_do_not_collide_with_prometheus_target_labels() -> None:
    """Prometheus sets ``instance`` and ``job`` on every scraped target; a metric label of that name
    would be renamed ``exported_instance``. kvtier's instance label is ``kvtier_instance``."""
    import queue
    from types import SimpleNamespace

    from kvtier.cluster.index import ChunkIndex
    from kvtier.metrics import INSTANCE_LABEL, ControllerMetrics

    index = ChunkIndex()
    index.admit("vllm-a", "cpu", [b"k" * 16])
    ctl = SimpleNamespace(workers={"vllm-a": SimpleNamespace(queue=queue.Queue())}, index=index, ops={})
    text = ControllerMetrics(ctl).render()[0].decode()
    assert INSTANCE_LABEL == "kvtier_instance"
    assert sample(text, "kvtier_controller_instance_keys", 'kvtier_instance="vllm-a",tier="cpu"') == 1
    assert sample(text, "kvtier_controller_command_queue_depth", 'kvtier_instance="vllm-a"') == 0
    labels = {name.split("=")[0] for line in text.splitlines() if "{" in line and not line.startswith("#")
              for name in line.split("{", 1)[1].split("}")[0].split(",")}
    assert not labels & {"instance", "job"}


@pytest.fixture
def kvtier_logger():
    import logging

    logger = logging.getLogger("kvtier")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_logging_follows_the_engine_unless_overridden(kvtier_logger, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from kvtier.metrics import configure_logging

    engine = logging.getLogger("fake-engine-for-kvtier-test")
    handler = logging.StreamHandler()
    engine.addHandler(handler)
    engine.setLevel(logging.DEBUG)
    monkeypatch.delenv("KVTIER_LOG_LEVEL", raising=False)
    try:
        assert configure_logging(engine) == logging.DEBUG
        assert kvtier_logger.level == logging.DEBUG
        assert handler in kvtier_logger.handlers and kvtier_logger.propagate is False
        configure_logging(engine)  # idempotent: no second copy of the handler
        assert kvtier_logger.handlers.count(handler) == 1
        monkeypatch.setenv("KVTIER_LOG_LEVEL", "warning")
        assert configure_logging(engine) == logging.WARNING
        assert load_config().chunk_tokens > 0  # not mistaken for a config key
        assert logging.getLogger("kvtier.engine").getEffectiveLevel() == logging.WARNING
        monkeypatch.setenv("KVTIER_LOG_LEVEL", "loud")
        with pytest.raises(ConfigError, match="KVTIER_LOG_LEVEL='loud'"):
            configure_logging(engine)
    finally:
        engine.removeHandler(handler)
