"""``kvtier bench cpu``: CPU tier store/retrieve throughput ÷ a same-run ``copy_`` ceiling.

The ceiling copies the same KV tensor into preallocated memory with ``torch.Tensor.copy_``; ours
stores it through :meth:`CacheEngine.store` (chunking, keying, slot reservation, copy into the arena)
and retrieves it back into a preallocated engine-side tensor. Every run times the ceiling, the store and
the retrieve back to back, so the per-run ratios (min / median / max over runs) compare measurements
the machine's drift hit alike; the worst run is the minimum. A second, identical ``copy_`` ("copy_
again") is timed in every run too: its ratio to the first is the machine's noise floor, the worst
ratio a copy that is exactly as fast as the ceiling reaches in this run.
"""

from __future__ import annotations

from typing import Any

import typer


def run(tokens: int = 8192, repeat: int = 7, dtype: str = "bfloat16", out_dir: str = "results",
        show: bool = True) -> dict[str, Any]:
    import numpy as np
    import torch

    from kvtier.bench.common import Report, interleaved
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
    try:
        times = interleaved({"copy_": lambda: dest.copy_(kv), "store": lambda: engine.store(ids, kv),
                             "retrieve": lambda: engine.retrieve(ids, dest),
                             "copy_ again": lambda: dest.copy_(kv)}, repeat, prepare={"store": engine.cpu.clear})
        engine.retrieve(ids, dest)
        if not torch.equal(dest, kv):
            raise RuntimeError("retrieve returned different bytes")
    finally:
        engine.close()
    report = Report("bench_cpu", f"CPU tier vs copy_, {tokens} tokens {dtype} ({nbytes / 1e6:.0f} MB)",
                    amount=nbytes / 1e9, meta={"tokens": tokens, "dtype": dtype, "bytes": nbytes})
    ceiling = report.add("copy_", times["copy_"])
    report.add("store", times["store"], vs=ceiling)
    report.add("retrieve", times["retrieve"], vs=ceiling)
    report.add("copy_ again", times["copy_ again"], vs=ceiling)
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("cpu")
    def cpu_cmd(
        tokens: int = typer.Option(8192, help="Tokens of SmolLM2-shaped KV to move."),
        repeat: int = typer.Option(7, min=1, help="Timed runs (min/median/max reported)."),
        dtype: str = typer.Option("bfloat16", help="KV dtype."),
        quick: bool = typer.Option(False, "--quick", help="2,048 tokens, 3 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """CPU tier store/retrieve GB/s ÷ same-run copy_ into preallocated memory."""
        if quick:
            tokens, repeat = 2048, 3
        run(tokens, repeat, dtype, out)
