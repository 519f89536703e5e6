"""Every timing benchmark runs end to end on a tiny workload against real components (servers, files)
and writes its JSON + PNG; the numbers are not asserted (that is what the benchmarks are for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from redis_support import redis_server_binary

needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")


def _rows(record: dict) -> dict[tuple[str, str], dict]:
    return {(r["series"], r["label"]): r for r in record["rows"]}


@pytest.mark.slow
@needs_redis
def test_tiers_engine_vs_ceiling_on_server_redis_disk(tmp_path: Path) -> None:
    from kvtier.bench.tiers import run

    record = run(("server", "redis", "disk"), tokens=512, repeat=3, out_dir=str(tmp_path), show=False)
    rows = _rows(record)
    for tier in ("server", "redis", "disk"):
        info = record["tiers"][tier]
        assert info["chunks"] == 2 and info["engine_counters"]["promoted_chunks"] >= 2
        assert "promoted_chunks" not in info["no_promotion_counters"]
        direct = info["no_promotion_counters"].get("direct_chunks", 0)
        assert direct + info["no_promotion_counters"].get("staged_chunks", 0) >= 2
        assert (direct >= 2) == (tier != "redis")  # redis cannot read into caller memory: staged
        assert info["tier_counters"].get("corrupt", 0) == 0
        cpu = info["cpu_ms"]
        assert cpu["retrieve"]["client"]["median"] > 0 and (cpu["ceiling read"]["peer"] is None) == (tier == "disk")
        for ours, ceiling in (("engine retrieve", "ceiling read"), ("engine retrieve, no promotion", "ceiling read"),
                              ("engine store", "ceiling write")):
            row = rows[(tier, ours)]
            assert row["vs"] == f"{tier}: {ceiling}" and len(row["runs"]) == 3 and row["ratio"]["median"] > 0
            assert isinstance(row["meets_goal"], bool)
    assert json.loads((tmp_path / "bench_tiers.json").read_text())["goal"] == 0.8
    assert (tmp_path / "bench_tiers.png").exists()


def test_tiers_rejects_an_unknown_tier(tmp_path: Path) -> None:
    from kvtier.bench.tiers import run
    from kvtier.errors import ConfigError

    with pytest.raises(ConfigError, match="--tier nfs"):
        run(("nfs",), out_dir=str(tmp_path))


@needs_redis
def test_redis_and_server_benches(tmp_path: Path) -> None:
    from kvtier.bench import redis, server

    r = _rows(redis.run(chunk_tokens=16, chunks=2, repeat=3, out_dir=str(tmp_path), show=False))
    assert r[("RedisTier", "put_parts")]["vs"] == "plain redis-py: put_parts"
    s = _rows(server.run(chunk_tokens=16, chunks=2, repeat=3, out_dir=str(tmp_path), show=False))
    assert {label for _series, label in s} == set(server.OPS) and s[("RemoteTier", "get")]["ratio"]["max"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"bench_redis.json", "bench_redis.png", "bench_server.json",
                                                    "bench_server.png"}


def test_cpu_lookup_disk_benches(tmp_path: Path) -> None:
    from kvtier.bench import cpu, disk, lookup

    c = _rows(cpu.run(tokens=512, repeat=2, out_dir=str(tmp_path), show=False))
    assert c[("", "retrieve")]["vs"] == "copy_" == c[("", "copy_ again")]["vs"]
    lk = _rows(lookup.run(tokens=1024, repeat=2, out_dir=str(tmp_path), show=False))
    assert lk[("", "lookup(list)")]["vs"] == "hash only" and "ms" in lk[("", "hash only")]
    d = disk.run(tmp_path / "scratch", 1 << 20, 3, num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=64,
                 out_dir=tmp_path, show=False)
    rows = _rows(d)
    assert rows[("CacheEngine via disk", "retrieve")]["vs"] == "raw (write+fsync / cold read): retrieve"
    assert rows[("DiskTier alone", "store")]["vs"] == "raw (write+fsync / cold read): store"
    assert not (tmp_path / "scratch").exists()


def test_engine_bench_outside_the_engine_env_names_the_command() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the router benchmark would start real servers")
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "router", "--quick"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "vllm is not installed in this interpreter" in out.stderr and "bench router" in out.stderr
