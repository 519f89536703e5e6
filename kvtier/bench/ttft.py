"""``kvtier bench ttft``: time to first token, full prefill vs a kvtier CPU-tier hit, embedded model.

For each context length ``n`` the first ``n`` tokens of the shipped document are stored once; then each
run times (a) a full prefill of ``context + suffix`` without kvtier and (b) the same prompt with the
context taken from kvtier's CPU tier (only the suffix is computed). Every run uses a different
``suffix_tokens``-token suffix, so a run never hits what the previous one stored. The reported ratio is
TTFT(full) / TTFT(hit): ``median`` = median full / median hit, ``min`` = fastest full / slowest hit
(worst case), ``max`` = slowest full / fastest hit (best case). Runs of (a) and (b) alternate so load
drift on a shared machine hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from kvtier.extras import require

TIERS = ("cpu", "disk", "server", "redis")


@contextlib.contextmanager
def _tier_overrides(tier: str, capacity: int) -> Iterator[dict[str, Any]]:
    """Config overrides that add ``tier`` below the CPU tier (starting a throwaway server if needed)."""
    if tier == "cpu":
        yield {}
    elif tier == "disk":
        with tempfile.TemporaryDirectory(prefix="kvtier-bench-ttft-") as path:
            yield {"disk": {"enabled": True, "path": path, "capacity": capacity}}
    elif tier == "server":
        from kvtier.bench.server import kvtier_server

        with kvtier_server(capacity) as port:
            yield {"remote": {"enabled": True, "port": port}}
    elif tier == "redis":
        from kvtier.bench.redis import redis_server
        from kvtier.errors import ConfigError

        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("--tier redis needs redis-server on PATH (apt-get install redis-server)")
        with redis_server(binary) as port:
            yield {"redis": {"enabled": True, "url": f"redis://127.0.0.1:{port}/0"}}
    else:
        raise typer.BadParameter(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")


def run_ttft(contexts: list[int], dtype: str = "bfloat16", runs: int = 3, suffix_tokens: int = 32,
             out_dir: Path | str = "results", *, progress: bool = True,
             model_dir: Path | None = None, tier: str = "cpu", show: bool = True) -> dict[str, Any]:
    """Run the benchmark; write ``bench_ttft[_<tier>].json`` and ``.png`` under ``out_dir``.

    With ``tier`` other than ``cpu`` the CPU tier is emptied before every timed hit (lower-tier writes
    flushed first), so the cached context comes from that tier, verified and promoted as in production.
    """
    with _tier_overrides(tier, 1 << 33) as lower:
        return _run(contexts, dtype, runs, suffix_tokens, out_dir, progress, model_dir, tier, lower, show)


def _run(contexts: list[int], dtype: str, runs: int, suffix_tokens: int, out_dir: Path | str, progress: bool,
         model_dir: Path | None, tier: str, lower: dict[str, Any], show: bool) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require("transformers", "hf")  # the model benchmarks need the hf extra next to bench
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtier.bench.common import Report
    from kvtier.config import load_config
    from kvtier.data import load_document
    from kvtier.engine import CacheEngine
    from kvtier.integrations.hf import HFCachedLM, kv_spec_for
    from kvtier.models import EMBEDDED_MODEL_ID, ensure_embedded_model
    from kvtier.tensors import dtype_from_name

    folder = model_dir or ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype_from_name(dtype))
    doc = list(tokenizer(load_document(), add_special_tokens=False)["input_ids"])
    total_runs = runs + 1  # one warm-up
    if max(contexts) + total_runs * suffix_tokens > len(doc):
        raise typer.BadParameter(f"the document has {len(doc)} tokens; contexts up to "
                                 f"{len(doc) - total_runs * suffix_tokens} fit")
    suffixes = [doc[len(doc) - (i + 1) * suffix_tokens: len(doc) - i * suffix_tokens] for i in range(total_runs)]
    chunk = load_config().chunk_tokens
    spec = kv_spec_for(model, chunk)
    slots = sum(n // chunk + 1 for n in contexts) + 2 * total_runs * len(contexts) + 2
    config = load_config(overrides={"cpu": {"capacity": slots * spec.chunk_bytes}, **lower})
    engine = CacheEngine(spec, EMBEDDED_MODEL_ID, config)
    lm = HFCachedLM(model, tokenizer, engine)

    name = "bench_ttft" if tier == "cpu" else f"bench_ttft_{tier}"
    report = Report(name, f"TTFT, {suffix_tokens}-token suffix ({dtype}), hits from {tier}", unit="s", meta={
        "model": EMBEDDED_MODEL_ID, "dtype": dtype, "runs": runs, "tier": tier, "suffix_tokens": suffix_tokens,
        "chunk_tokens": chunk})
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ttft", total=len(contexts) * (1 + 2 * total_runs))
        for n in contexts:
            context = doc[:n]
            lm.generate(context, 1, use_kvtier=True)  # store the context (also warms the kernels)
            bar.advance(task)
            full: list[float] = []
            hit: list[float] = []
            same = True
            hits: set[int] = set()
            for i, suffix in enumerate(suffixes):
                a = lm.generate(context + suffix, 1, use_kvtier=False)
                bar.advance(task)
                if tier != "cpu":  # the context must come from the lower tier
                    engine.storage.flush()
                    engine.cpu.clear()
                b = lm.generate(context + suffix, 1, use_kvtier=True)
                bar.advance(task)
                same &= a.tokens == b.tokens
                hits.add(b.hit_tokens)
                if i > 0:  # run 0 is the warm-up
                    full.append(a.ttft_s)
                    hit.append(b.ttft_s)
            base = report.add(f"{n} tokens", full, series="full prefill")
            report.add(f"{n} tokens", hit, series="kvtier hit", vs=base, hit_tokens=max(hits),
                       first_token_identical=same)
    engine.close()
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("ttft")
    def ttft(
        contexts: str = typer.Option("1024,2048,4096,8192", help="Comma-separated context lengths (tokens)."),
        dtype: str = typer.Option("bfloat16", help="Model dtype: bfloat16 or float32."),
        runs: int = typer.Option(3, min=1, help="Timed runs per context (after one warm-up)."),
        suffix_tokens: int = typer.Option(32, min=1, help="New tokens after the cached context."),
        out: str = typer.Option("results", help="Output directory."),
        threads: int = typer.Option(0, min=0, help="torch CPU threads (0 = torch default)."),
        tier: str = typer.Option("cpu", help="Where hits come from: cpu, disk, server or redis."),
    ) -> None:
        """TTFT of a full prefill vs a kvtier hit on the embedded model (goals at 4K bf16: ≥ 20× from
        CPU, ≥ 12× from disk / server / Redis)."""
        if dtype not in ("bfloat16", "float32"):
            raise typer.BadParameter("dtype must be bfloat16 or float32", param_hint="--dtype")
        if threads:
            import torch

            torch.set_num_threads(threads)
        lengths = [int(c) for c in contexts.split(",") if c.strip()]
        run_ttft(lengths, dtype, runs, suffix_tokens, out, tier=tier)
