"""``kvtier bench lookup``: latency of :meth:`CacheEngine.lookup` for a long fully cached prompt.

Measured for token ids given as a Python list (what vLLM hands over), as a tensor (HF) and as a uint32
array (no conversion), each over many runs; the report includes the cost of hashing alone and of
converting the list, as ceilings.
"""

from __future__ import annotations

import typer


def run(tokens: int = 32768, repeat: int = 50, out_dir: str = "results") -> dict:
    import numpy as np
    import torch

    from kvtier.bench.common import bar_plot, time_runs, write_results
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
    engine.store(ids, torch.zeros(spec.chunk_shape(tokens), dtype=spec.torch_dtype))
    assert engine.lookup(as_list) == tokens
    rows = {
        "lookup(list)": time_runs(lambda: engine.lookup(as_list), repeat=repeat, warmup=3),
        "lookup(tensor)": time_runs(lambda: engine.lookup(as_tensor), repeat=repeat, warmup=3),
        "lookup(array)": time_runs(lambda: engine.lookup(ids), repeat=repeat, warmup=3),
        "hash only": time_runs(lambda: engine.chunker.chunks(ids), repeat=repeat, warmup=3),
        "list -> array": time_runs(lambda: as_token_array(as_list), repeat=repeat, warmup=3),
    }
    engine.close()
    result = {"tokens": tokens, "chunk_tokens": spec.chunk_tokens,
              **{name: {k: v * 1e3 if k.endswith("_s") else v for k, v in t.summary().items()}
                 for name, t in rows.items()}, "unit": "ms"}
    write_results("bench_lookup", result, out_dir)
    names = list(rows)
    bar_plot(f"{out_dir}/bench_lookup.png", f"lookup of a cached {tokens}-token prompt", names,
             {"ms (median)": [rows[n].median * 1e3 for n in names]}, "milliseconds",
             errors={"ms (median)": ([rows[n].min * 1e3 for n in names], [rows[n].max * 1e3 for n in names])})
    return result


def register(app: typer.Typer) -> None:
    @app.command("lookup")
    def lookup_cmd(
        tokens: int = typer.Option(32768, help="Prompt length in tokens."),
        repeat: int = typer.Option(50, help="Timed runs."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """Lookup latency for a long cached prompt (goal: <= 0.5 ms median at 32K tokens)."""
        from rich.console import Console
        from rich.table import Table

        r = run(tokens, repeat, out)
        table = Table(title=f"lookup, {tokens} tokens (ms)")
        for col in ("what", "min", "median", "max"):
            table.add_column(col)
        for name in ("lookup(list)", "lookup(tensor)", "lookup(array)", "hash only", "list -> array"):
            table.add_row(name, *(f"{r[name][k]:.3f}" for k in ("min_s", "median_s", "max_s")))
        Console().print(table)
