"""kvtier's metrics inside vLLM's own ``/metrics`` (vLLM's connector-stats mechanism), and kvtier's log
lines in vLLM's log. The end-to-end test starts STOCK vLLM (``python -m vllm.entrypoints.openai.api_server``
with a hand-written ``--kv-transfer-config``), not ``kvtier serve``. Skipped without vllm (main venv)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import vllm_support
from vllm_support import MAX_TOKENS, PROMPTS, free_port

pytest.importorskip("vllm")

vllm_env = vllm_support.vllm_env


def _samples(text: str, name: str) -> dict[str, float]:
    """``{label text: value}`` of every sample of ``name`` in an exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = line[len(name):].rsplit(" ", 1)[0]
            out[labels] = float(line.rsplit(" ", 1)[1])
    return out


def test_stats_are_increments_that_aggregate_and_reach_prometheus() -> None:
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

    from kvtier.integrations.vllm import KvtierConnector
    from kvtier.integrations.vllm.stats import StatsTracker, engine_samples, key

    stats = {"engine": {"lookups": 2, "lookup_tokens": 1000, "lookup_hit_tokens": 768},
             "cpu": {"used_bytes": 4096, "chunks": 3}, "manager": {"queue_depth": 0},
             "disk": {"healthy": 1, "hits": 3, "bytes_read": 300, "errors": 1}}
    tracker = StatsTracker()
    counters, gauges = engine_samples(stats, {"loaded_tokens": 768, "load_failures": 0}, token_bytes=10)
    tracker.time("load", 0.004)
    first = tracker.take(counters, gauges)
    assert first is not None
    assert first.data["counters"][key("kvtier_lookup_tokens", "miss")] == 232
    assert first.data["counters"][key("kvtier_connector_bytes", "load")] == 7680
    assert first.data["seconds"] == {"load": [0.004]}
    assert tracker.take(counters, gauges) is None  # nothing new: nothing to send
    stats["engine"]["lookup_hit_tokens"] = 1000
    stats["engine"]["lookup_tokens"] = 1500
    second = tracker.take(*engine_samples(stats, {"loaded_tokens": 768}, token_bytes=10))
    assert second is not None and second.data["counters"] == {key("kvtier_lookup_tokens", "hit"): 232.0,
                                                                key("kvtier_lookup_tokens", "miss"): 268.0}
    # vLLM aggregates workers' stats, ships .data to the API server and rebuilds them there
    total = KvtierConnector.build_kv_connector_stats(json.loads(json.dumps(first.data)))
    assert total is not None
    total = total.aggregate(second)
    assert total.data["counters"][key("kvtier_lookup_tokens", "hit")] == 1000
    assert total.reduce() == {"tokens_load": 768, "load_ms_avg": 4.0}
    types = {Counter: Counter, Gauge: Gauge, Histogram: Histogram}
    config = SimpleNamespace(kv_transfer_config=None)
    prom = KvtierConnector.build_prom_metrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})  # type: ignore[arg-type]
    again = KvtierConnector.build_prom_metrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})  # type: ignore[arg-type]
    assert prom is not None and again is not None  # a second engine in one process re-registers cleanly
    again.observe(total.data, 0)
    text = generate_latest(REGISTRY).decode()
    assert _samples(text, "kvtier_lookup_tokens_total") == {'{engine="0",model_name="m",result="hit"}': 1000.0,
                                                            '{engine="0",model_name="m",result="miss"}': 500.0}
    assert _samples(text, "kvtier_tier_errors_total") == {'{engine="0",model_name="m",tier="disk"}': 1.0}
    assert _samples(text, "kvtier_cpu_used_bytes") == {'{engine="0",model_name="m"}': 4096.0}
    assert _samples(text, "kvtier_connector_seconds_count") == {'{engine="0",model_name="m",op="load"}': 1.0}


@pytest.mark.slow
def test_stock_vllm_server_exports_kvtier_metrics(vllm_env: dict[str, str], model_dir: Path, tmp_path: Path) -> None:
    """Stock vLLM with the connector: after a hit, vLLM's /metrics holds kvtier's counters (hits, bytes,
    latency) under vLLM's own labels, no label collides with Prometheus target labels, and kvtier's
    INFO lines appear in vLLM's log (kvtier follows the engine's log level)."""
    from kvtier.procs import stop_process, wait_healthy

    port = free_port()
    transfer = {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"kvtier": {"chunk_tokens": 128, "cpu": {"capacity": "256MiB"}}}}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "2048", "--enforce-eager", "--no-enable-prefix-caching",
            "--kv-transfer-config", json.dumps(transfer)]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "KVTIER_LOG_LEVEL")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, 600)
            body = json.dumps({"model": "smol", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                               "temperature": 0}).encode()
            for _ in range(2):  # a miss that stores, then a hit
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as resp:
                    assert json.loads(resp.read())["choices"][0]["text"]
            deadline = time.monotonic() + 30  # stats reach the API server with the next engine-core output
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    metrics = resp.read().decode()
                loaded = _samples(metrics, "kvtier_connector_tokens_total")
                if any("load" in labels and value > 0 for labels, value in loaded.items()) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(1)
        finally:
            stop_process(proc, 30)
            with contextlib.suppress(ProcessLookupError):  # vLLM's engine-core and worker processes too
                os.killpg(proc.pid, signal.SIGKILL)
    hit = _samples(metrics, "kvtier_lookup_tokens_total")
    assert hit.get('{engine="0",model_name="smol",result="hit"}', 0) >= 600, hit  # PROMPTS[0] is ~680 tokens
    assert loaded.get('{engine="0",model_name="smol",op="load"}', 0) >= 600, loaded
    saved = _samples(metrics, "kvtier_connector_bytes_total")
    assert saved.get('{engine="0",model_name="smol",op="save"}', 0) >= 600 * 46080, saved  # fp32 SmolLM2
    assert _samples(metrics, "kvtier_connector_seconds_count").get('{engine="0",model_name="smol",op="load"}') == 1
    assert _samples(metrics, "kvtier_cpu_used_bytes").get('{engine="0",model_name="smol"}', 0) > 0
    assert "exported_instance" not in metrics
    for line in metrics.splitlines():
        if line.startswith("kvtier_") and "{" in line:
            names = {pair.split("=")[0] for pair in line.split("{", 1)[1].split("}")[0].split(",")}
            assert not names & {"instance", "job"}, line
    text = log.read_text()
    assert "kvtier: 30 layers (one buffer)" in text  # an INFO line of the worker's connector, in vLLM's log
