"""``kvtier bench lower``: CacheEngine store / retrieve through one lower tier ÷ that tier's raw ceiling.

What users wait on when the CPU tier does not hold their prefix: ``CacheEngine.retrieve`` of a long
prompt (8,192 bf16 tokens of SmolLM2-135M geometry by default, 32 chunks) with the CPU tier emptied, so
every chunk comes from the lower tier (read, verified, promoted to CPU, copied out), and
``CacheEngine.store`` until every chunk is written to that tier (copy in, frame, write-back).

Ceilings, measured in the same run on the same bytes and interleaved with ours (the order alternates
every run, so machine noise hits both sides alike):

- ``server``: a plain-socket peer on loopback streaming the frames back to back into a preallocated
  buffer (read) / receiving them (write): raw loopback TCP, no framing, no checksum, no round trips;
- ``redis``: a plain ``redis.Redis`` client doing one pipelined batch of ``GET`` (read) / ``SET``
  (write) of the same frames against the same redis-server.

The disk tier's engine numbers (against a raw cold read with the page cache dropped) are in
``kvtier bench disk``.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer

TIERS = ("server", "redis")
GOAL = 0.8


def _paired(ours: list[float], ceiling: list[float]) -> dict[str, float]:
    """Throughput ratio ours ÷ ceiling of each run (both measured back to back): min / median / max."""
    per_run = [c / o for o, c in zip(ours, ceiling)]
    return {"min": min(per_run), "median": statistics.median(per_run), "max": max(per_run)}


@contextlib.contextmanager
def _server_ceiling(frames: list[bytes]) -> Iterator[tuple[Callable[[], None], Callable[[], None], Any]]:
    """Raw loopback TCP read / write of ``frames`` and a RemoteTier on a fresh ``kvtier server``."""
    from kvtier.bench.server import _SINK, _exact, _process, kvtier_server
    from kvtier.storage.remote import RemoteTier

    size = len(frames[0])
    capacity = 3 * size * len(frames) + (64 << 20)
    with kvtier_server(capacity) as port, _process([sys.executable, "-c", _SINK, str(size)], r"^(\d+)$") as sink_port:
        raw = socket.create_connection(("127.0.0.1", sink_port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        into = memoryview(bytearray(size))
        ack = memoryview(bytearray(1))

        def read() -> None:
            raw.sendall(b"G" + struct.pack("<I", len(frames)))
            for _ in frames:
                _exact(raw, into)

        def write() -> None:
            raw.sendall(b"P" + struct.pack("<I", len(frames)))
            for f in frames:
                raw.sendall(f)
            _exact(raw, ack)

        tier = RemoteTier("127.0.0.1", port, timeout_s=30.0)
        try:
            yield read, write, tier
        finally:
            raw.close()


@contextlib.contextmanager
def _redis_ceiling(frames: list[bytes]) -> Iterator[tuple[Callable[[], None], Callable[[], None], Any]]:
    """Pipelined plain redis-py GET / SET of ``frames`` and a RedisTier on a fresh redis-server."""
    import shutil

    import redis

    from kvtier.bench.redis import redis_server
    from kvtier.errors import ConfigError
    from kvtier.storage.redis import RedisTier

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise ConfigError("kvtier bench lower --tier redis needs redis-server on PATH")
    names = [b"ceiling:%d" % i for i in range(len(frames))]
    with redis_server(binary) as port:
        plain = redis.Redis(host="127.0.0.1", port=port)

        def read() -> None:
            pipe = plain.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            if any(v is None for v in pipe.execute()):
                raise RuntimeError("redis lost a ceiling frame")

        def write() -> None:
            pipe = plain.pipeline(transaction=False)
            for name, frame in zip(names, frames):
                pipe.set(name, frame)
            pipe.execute()

        write()
        tier = RedisTier(f"redis://127.0.0.1:{port}/0")
        try:
            yield read, write, tier
        finally:
            plain.close()


def run(tier: str = "server", tokens: int = 8192, repeat: int = 5, out_dir: str = "results") -> dict[str, Any]:
    import numpy as np
    import torch

    from kvtier import frames as wire_frames
    from kvtier.bench.common import Timing, bar_plot, write_results
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.errors import ConfigError
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.record import token_record

    if tier not in TIERS:
        raise ConfigError(f"kvtier bench lower: --tier {tier!r}, expected one of {', '.join(TIERS)}")
    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")  # SmolLM2-135M geometry
    ids = np.arange(tokens, dtype=np.uint32) * 7 + 3
    model = f"bench-lower-{tier}"
    cfg = load_config(environ={}, overrides={
        "store_queue": tokens // spec.chunk_tokens + 2,
        "cpu": {"capacity": (tokens // spec.chunk_tokens + 2) * spec.chunk_bytes},
    })
    kv = torch.randn(spec.chunk_shape(tokens), generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    into = torch.empty_like(kv)
    arr, chunks = Chunker(Namespace(model, spec, tenant=cfg.tenant)).chunks(ids)
    frames = [wire_frames.pack(token_record(c, arr), kv[:, :, c.start : c.end].contiguous(), spec) for c in chunks]
    nbytes = sum(len(f) for f in frames)
    times: dict[str, list[float]] = {k: [] for k in ("ceiling_read", "engine_retrieve", "ceiling_write",
                                                     "engine_store")}
    ceiling = _server_ceiling if tier == "server" else _redis_ceiling
    with ceiling(frames) as (raw_read, raw_write, lower):
        engine = CacheEngine(spec, model, cfg, tiers=[(lower, "raw")])
        try:
            def engine_retrieve() -> None:
                if engine.retrieve(ids, into) != tokens:
                    raise RuntimeError(f"retrieve missed: {engine.stats()}")

            def engine_store() -> None:
                if engine.store(ids, kv) != tokens or not engine.storage.flush(600):
                    raise RuntimeError(f"store did not complete: {engine.stats()}")

            reads = {"ceiling_read": raw_read, "engine_retrieve": engine_retrieve}
            writes = {"ceiling_write": raw_write, "engine_store": engine_store}
            for i in range(repeat + 1):  # run 0 warms up (connections, arena pages, server memory)
                for group in (writes, reads):
                    names = list(group) if i % 2 == 0 else list(group)[::-1]
                    for name in names:
                        engine.cpu.clear()  # every chunk comes from / goes to the lower tier
                        if name == "engine_store":
                            engine.storage.clear()
                        start = time.perf_counter()
                        group[name]()
                        if i:
                            times[name].append(time.perf_counter() - start)
            engine.cpu.clear()
            engine_retrieve()
            if not torch.equal(into, kv):
                raise RuntimeError("retrieve returned different bytes than were stored")
            stats = engine.stats()
        finally:
            engine.close()

    gb = nbytes / 1e9
    timing = {k: Timing(v) for k, v in times.items()}
    ratios = {"retrieve": _paired(times["engine_retrieve"], times["ceiling_read"]),
              "store": _paired(times["engine_store"], times["ceiling_write"])}
    lower_stats = {k: v for k, v in stats.get(lower.name, {}).items() if isinstance(v, int | float)}
    result: dict[str, Any] = {
        "tier": tier, "tokens": tokens, "chunks": len(chunks), "bytes": nbytes, "repeat": repeat,
        "ceiling": {"server": "raw loopback TCP stream of the same bytes",
                    "redis": "pipelined plain redis-py GET / SET of the same frames"}[tier],
        "gbps": {k: t.rate(gb) for k, t in timing.items()},
        "seconds": {k: t.summary() for k, t in timing.items()},
        "paired_ratios": ratios, "goal": GOAL,
        "meets_goal": {k: v["median"] >= GOAL for k, v in ratios.items()},
        "engine_counters": stats["engine"], "tier_counters": lower_stats,
    }
    write_results(f"bench_lower_{tier}", result, out_dir)
    g = result["gbps"]
    bar_plot(f"{out_dir}/bench_lower_{tier}.png",
             f"CacheEngine via {tier}, {tokens} bf16 tokens ({nbytes / 1e6:.0f} MB), CPU tier emptied",
             ["retrieve", "store until written"],
             {"ceiling": [g["ceiling_read"]["median"], g["ceiling_write"]["median"]],
              "CacheEngine": [g["engine_retrieve"]["median"], g["engine_store"]["median"]]},
             "GB/s (median, min/max whiskers)",
             errors={"ceiling": ([g["ceiling_read"]["min"], g["ceiling_write"]["min"]],
                                 [g["ceiling_read"]["max"], g["ceiling_write"]["max"]]),
                     "CacheEngine": ([g["engine_retrieve"]["min"], g["engine_store"]["min"]],
                                     [g["engine_retrieve"]["max"], g["engine_store"]["max"]])})
    return result


def register(app: typer.Typer) -> None:
    @app.command("lower")
    def lower_cmd(
        tier: str = typer.Option("server", help="Lower tier: server or redis (disk: `kvtier bench disk`)."),
        tokens: int = typer.Option(8192, help="Tokens of SmolLM2-shaped bf16 KV per run."),
        repeat: int = typer.Option(5, min=3, help="Timed runs (min/median/max reported)."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """CacheEngine retrieve (CPU tier emptied) / store-until-written through a lower tier ÷ raw ceiling."""
        from rich.console import Console
        from rich.table import Table

        r = run(tier, tokens, repeat, out)
        table = Table(title=f"CacheEngine via {tier}: {r['bytes'] / 1e6:.0f} MB, {r['repeat']} runs")
        for col in ("operation", "GB/s min", "median", "max", "÷ ceiling per run: min", "median", "max",
                    f"≥ {GOAL}"):
            table.add_column(col)
        for op, key in (("ceiling_read", None), ("engine_retrieve", "retrieve"), ("ceiling_write", None),
                        ("engine_store", "store")):
            g = r["gbps"][op]
            q = r["paired_ratios"].get(key) if key else None
            spread = [f"{q[k]:.2f}" for k in ("min", "median", "max")] if q else ["", "", ""]
            verdict = ("yes" if r["meets_goal"][key] else "NO") if key else ""
            table.add_row(op, f"{g['min']:.2f}", f"{g['median']:.2f}", f"{g['max']:.2f}", *spread, verdict)
        Console().print(table)
