"""``kvtier bench lookup``: latency of :meth:`CacheEngine.lookup` for a long fully cached prompt.

Measured for token ids given as a Python list (what vLLM hands over), as a tensor (HF) and as a uint32
array (no conversion), each over many runs; the report includes the cost of hashing alone and of
converting the list, as ceilings (each lookup's ratio is against hashing alone).
"""

from __future__ import annotations

from typing import Any

import typer


def run(tokens: int = 32768, repeat: int = 50, out_dir: str = "results", show: bool = True) -> dict[str, Any]:
    import numpy as np
    import torch

    from kvtier.bench.common import Report, interleaved
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.keys import as_token_array
    from kvtier.layout import KVSpec

    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="bfloat16")  # lookup cost ignores size
    ids = np.random.default_rng(0).integers(0, 49152, tokens, dtype=np.uint32)
    as_list = ids.tolist()
    as_tensor = torch.from_numpy(ids.astype(np.int64))
    cfg = load_config(overrides={"cpu": {"capacity": (tokens // spec.chunk_tokens + 2) * spec.chunk_bytes}})
    engine = CacheEngine(spec, "bench-lookup", cfg, tiers=[])
    try:
        engine.store(ids, torch.zeros(spec.chunk_shape(tokens), dtype=spec.torch_dtype))
        if engine.lookup(as_list) != tokens:
            raise RuntimeError("lookup of the stored prompt missed")
        times = interleaved({
            "hash only": lambda: engine.chunker.hashed(ids),
            "list -> array": lambda: as_token_array(as_list),
            "lookup(array)": lambda: engine.lookup(ids),
            "lookup(tensor)": lambda: engine.lookup(as_tensor),
            "lookup(list)": lambda: engine.lookup(as_list),
        }, repeat, warmup=3)
    finally:
        engine.close()
    report = Report("bench_lookup", f"lookup of a cached {tokens}-token prompt", unit="ms",
                    meta={"tokens": tokens, "chunk_tokens": spec.chunk_tokens})
    hashing = report.add("hash only", times["hash only"])
    report.add("list -> array", times["list -> array"])
    for name in ("lookup(array)", "lookup(tensor)", "lookup(list)"):
        report.add(name, times[name], vs=hashing)
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("lookup")
    def lookup_cmd(
        tokens: int = typer.Option(32768, help="Prompt length in tokens."),
        repeat: int = typer.Option(50, min=1, help="Timed runs."),
        quick: bool = typer.Option(False, "--quick", help="5 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """Lookup latency for a long cached prompt (goal: <= 0.1 ms median at 32K tokens, array ids)."""
        run(tokens, 5 if quick else repeat, out)
