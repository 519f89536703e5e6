"""``kvtier bench cpu``: CPU tier store/retrieve throughput ÷ a same-run ``copy_`` ceiling.

The ceiling copies the same KV tensor into preallocated memory with ``torch.Tensor.copy_``; ours
stores it through :meth:`CacheEngine.store` (chunking, keying, slot reservation, copy into the arena)
and retrieves it back into a preallocated engine-side tensor. Every run times the ceiling, the store and
the retrieve back to back, so the per-run ratios (``paired``: min / median / max over runs) compare
measurements the machine's drift hit alike; the worst run is the paired minimum.
"""

from __future__ import annotations

import typer


def run(tokens: int = 8192, repeat: int = 7, dtype: str = "bfloat16", out_dir: str = "results") -> dict:
    import statistics
    import time

    import numpy as np
    import torch

    from kvtier.bench.common import Timing, bar_plot, ratio, write_results
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.layout import KVSpec

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype)  # SmolLM2-135M geometry
    kv = torch.randn(spec.chunk_shape(tokens)).to(spec.torch_dtype)
    dest = torch.empty_like(kv)
    ids = np.arange(tokens, dtype=np.uint32)
    nbytes = kv.numel() * kv.element_size()
    cfg = load_config(overrides={"cpu": {"capacity": nbytes + 4 * spec.chunk_bytes}})
    engine = CacheEngine(spec, "bench-cpu", cfg, tiers=[])
    runs: dict[str, list[float]] = {"copy": [], "store": [], "retrieve": []}
    ops = {"copy": lambda: dest.copy_(kv), "store": lambda: engine.store(ids, kv),
           "retrieve": lambda: engine.retrieve(ids, dest)}
    try:
        for i in range(repeat + 1):  # run 0 warms up
            engine.cpu.clear()
            for name, fn in ops.items():
                start = time.perf_counter()
                fn()
                if i:
                    runs[name].append(time.perf_counter() - start)
        assert torch.equal(dest, kv), "retrieve returned different bytes"
    finally:
        engine.close()
    ceiling, store, retrieve = Timing(runs["copy"]), Timing(runs["store"]), Timing(runs["retrieve"])

    def paired(name: str) -> dict[str, float]:
        per_run = [c / o for c, o in zip(runs["copy"], runs[name])]
        return {"min": min(per_run), "median": statistics.median(per_run), "max": max(per_run)}

    gb = nbytes / 1e9
    result = {
        "tokens": tokens,
        "dtype": dtype,
        "bytes": nbytes,
        "copy_ceiling": {**ceiling.summary(), "GBps": ceiling.rate(gb)},
        "store": {**store.summary(), "GBps": store.rate(gb), "ratio_vs_copy": ratio(store, ceiling),
                  "paired_ratio_vs_copy": paired("store")},
        "retrieve": {**retrieve.summary(), "GBps": retrieve.rate(gb), "ratio_vs_copy": ratio(retrieve, ceiling),
                     "paired_ratio_vs_copy": paired("retrieve")},
    }
    write_results("bench_cpu", result, out_dir)
    labels = ["copy_ ceiling", "store", "retrieve"]
    timings = [ceiling, store, retrieve]
    bar_plot(f"{out_dir}/bench_cpu.png", f"CPU tier, {tokens} tokens {dtype} ({nbytes / 1e6:.0f} MB)", labels,
             {"GB/s (median)": [t.rate(gb)["median"] for t in timings]}, "GB/s",
             errors={"GB/s (median)": ([t.rate(gb)["min"] for t in timings], [t.rate(gb)["max"] for t in timings])})
    return result


def register(app: typer.Typer) -> None:
    @app.command("cpu")
    def cpu_cmd(
        tokens: int = typer.Option(8192, help="Tokens of SmolLM2-shaped KV to move."),
        repeat: int = typer.Option(7, help="Timed runs (min/median/max reported)."),
        dtype: str = typer.Option("bfloat16", help="KV dtype."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """CPU tier store/retrieve GB/s ÷ same-run copy_ into preallocated memory."""
        from rich.console import Console
        from rich.table import Table

        r = run(tokens, repeat, dtype, out)
        table = Table(title=f"CPU tier vs copy_ ({r['bytes'] / 1e6:.0f} MB)")
        for col in ("op", "GB/s min", "GB/s median", "GB/s max", "÷ copy_ per run: worst", "median"):
            table.add_column(col)
        for op in ("copy_ceiling", "store", "retrieve"):
            g = r[op]["GBps"]
            rel = r[op].get("paired_ratio_vs_copy", {"min": 1.0, "median": 1.0})
            table.add_row(op, f"{g['min']:.2f}", f"{g['median']:.2f}", f"{g['max']:.2f}", f"{rel['min']:.2f}x",
                          f"{rel['median']:.2f}x")
        Console().print(table)
