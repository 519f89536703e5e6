"""``kvtier bench tiers``: engine-level GB/s each way for remote tiers on the same workload — the
Mooncake Store, our cache server and Redis — against the CPU tier measured in the same run.

Workload: 8K tokens of SmolLM2-shaped bf16 KV (30 layers, 3 KV heads, head dim 64; 256-token chunks;
~180 MiB). For each tier, every timed run uses fresh token ids (nothing cached), then:

- write: ``store`` into the CPU tier plus the write-back to the tier until ``flush`` returns;
- read: the CPU tier emptied (``cpu.clear()``), then ``retrieve`` of the whole prefix from the tier.

The ceiling is the same engine with the CPU tier only (store, and retrieve from CPU): a tier's ratio
says what fraction of in-memory speed it reaches. Every process (master, server, redis-server) is
started privately on loopback and stopped at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import typer

from kvtier.bench.common import Timing, bar_plot, ratio, time_runs, write_results

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


@contextlib.contextmanager
def _tier_configs(work: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """Config overrides per tier, with the processes behind them running; a tier that cannot start
    here is left out (and said so)."""
    from kvtier.bench.server import kvtier_server

    found: dict[str, dict[str, Any]] = {"cpu": {}}
    with contextlib.ExitStack() as stack:
        try:
            from kvtier.storage.mooncake_master import MooncakeMaster

            m = stack.enter_context(MooncakeMaster(work / "mooncake.log"))
            found["mooncake"] = {"mooncake": {"enabled": True, "master": m.master, "metadata_server": m.metadata_server,
                                              "segment": "2GiB", "buffer": "256MiB"}}
        except RuntimeError as exc:
            typer.echo(f"mooncake skipped: {exc}", err=True)
        port = stack.enter_context(kvtier_server(2 << 30))
        found["server"] = {"remote": {"enabled": True, "port": port, "timeout_s": 30.0}}
        binary = shutil.which("redis-server")
        if binary:
            from kvtier.bench.redis import redis_server

            rport = stack.enter_context(redis_server(binary))
            found["redis"] = {"redis": {"enabled": True, "url": f"redis://127.0.0.1:{rport}/0", "timeout_s": 30.0}}
        else:
            typer.echo("redis skipped: no redis-server", err=True)
        yield found


def _measure(overrides: dict[str, Any], tokens: int, chunk: int, repeat: int) -> dict[str, Timing]:
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.layout import KVSpec

    spec = KVSpec(LAYERS, KV_HEADS, HEAD_DIM, "bfloat16", chunk)
    cfg = load_config(environ={}, overrides={"chunk_tokens": chunk, "store_queue": 4096,
                                             "cpu": {"capacity": 2 * tokens * spec.bytes_per_token}, **overrides})
    engine = CacheEngine(spec, "bench-tiers", cfg)
    tier = next((s.tier for s in engine.storage.slots), None)
    if tier is not None and hasattr(tier, "wait_ready"):
        tier.wait_ready(60)
    kv = torch.randn(spec.chunk_shape(tokens)).to(torch.bfloat16)
    out = torch.empty_like(kv)
    state = {"round": 0}

    def ids() -> list[int]:
        base = 1_000_000 * (state["round"] + 1)
        return list(range(base, base + tokens))

    def fresh() -> None:  # new token ids; drop the previous round everywhere (bounded memory)
        state["round"] += 1
        engine.clear()

    def write() -> None:
        assert engine.store(ids(), kv) == tokens
        assert engine.storage.flush(300)

    def read() -> None:
        hit = engine.retrieve(ids(), out)
        assert hit == tokens, f"read back {hit} of {tokens} tokens"

    def read_setup() -> None:
        fresh()
        write()
        if engine.storage.enabled:
            engine.cpu.clear()

    try:
        return {"write": time_runs(write, repeat, setup=fresh), "read": time_runs(read, repeat, setup=read_setup)}
    finally:
        engine.close()


def run(tokens: int = 8192, chunk_tokens: int = 256, repeat: int = 5, out_dir: str = "results") -> dict[str, Any]:
    gb = tokens * 2 * LAYERS * KV_HEADS * HEAD_DIM * 2 / 1e9  # K and V, 2 bytes each
    result: dict[str, Any] = {"tokens": tokens, "chunk_tokens": chunk_tokens, "bytes": gb * 1e9, "tiers": {}}
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-tiers-") as work, _tier_configs(Path(work)) as tiers:
        timings = {name: _measure(over, tokens, chunk_tokens, repeat) for name, over in tiers.items()}
    ceiling = timings["cpu"]
    for name, t in timings.items():
        result["tiers"][name] = {op: {**t[op].summary(), "GBps": t[op].rate(gb),
                                      "ratio_vs_cpu": ratio(t[op], ceiling[op])} for op in ("write", "read")}
    path = write_results("tiers", result, out_dir)
    names = list(result["tiers"])
    series: dict[str, list[float]] = {op: [result["tiers"][n][op]["GBps"]["median"] for n in names]
                                      for op in ("write", "read")}
    errors: dict[str, tuple[list[float], list[float]]] = {
        op: ([result["tiers"][n][op]["GBps"]["min"] for n in names],
             [result["tiers"][n][op]["GBps"]["max"] for n in names]) for op in ("write", "read")}
    bar_plot(path.with_suffix(".png"), f"{tokens} bf16 tokens, CPU tier emptied before reads", names, series,
             "GB/s (median, min/max whiskers)", errors=errors)
    return result


def register(app: typer.Typer) -> None:
    @app.command("tiers")
    def tiers_cmd(
        tokens: int = typer.Option(8192, help="Prompt tokens moved per timed run (SmolLM2-shaped bf16 KV)."),
        chunk_tokens: int = typer.Option(256, help="Tokens per chunk."),
        repeat: int = typer.Option(5, min=3, help="Timed runs (min/median/max reported)."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """Mooncake vs kvtier server vs Redis: engine GB/s each way ÷ the CPU tier, same run."""
        from rich.console import Console
        from rich.table import Table

        r = run(tokens, chunk_tokens, repeat, out)
        table = Table(title=f"{tokens} bf16 tokens ({r['bytes'] / 2**20:.0f} MiB) per run")
        for col in ("tier", "write GB/s min", "med", "max", "÷ cpu", "read GB/s min", "med", "max", "÷ cpu"):
            table.add_column(col)
        for name, t in r["tiers"].items():
            w, rd = t["write"], t["read"]
            table.add_row(name, *(f"{w['GBps'][k]:.2f}" for k in ("min", "median", "max")),
                          f"{w['ratio_vs_cpu']['median']:.2f}x",
                          *(f"{rd['GBps'][k]:.2f}" for k in ("min", "median", "max")),
                          f"{rd['ratio_vs_cpu']['median']:.2f}x")
        Console().print(table)


