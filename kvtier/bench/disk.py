"""``kvtier bench disk``: disk tier store/retrieve throughput ÷ raw file I/O of the same bytes.

Per run, on a fresh directory, with the page cache dropped before every read phase:

- raw write: each chunk's frame bytes written to its own file with ``writev`` + ``fsync`` (no rename,
  no directory sync) — the ceiling for store;
- raw cold read: those files read back with one ``read`` each — the ceiling for retrieve;
- tier: ``DiskTier.put_parts`` of the same frames / ``DiskTier.get_into`` (payload straight into a
  reused destination, no verification), as the manager calls them;
- engine: ``CacheEngine.store`` + ``flush`` until every chunk is on disk ("store until readable"), then
  with the CPU tier cleared, ``CacheEngine.retrieve`` (read, checksum, decode, promote, copy out).

Dropping the cache: ``/proc/sys/vm/drop_caches`` when root, else ``posix_fadvise(DONTNEED)`` per file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

GOAL = 0.7


def _drop_caches(dirs: list[Path]) -> str:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
        return "drop_caches"
    for d in dirs:
        for path in d.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "fadvise_dontneed"


PAIRS = {  # ratio name: (our operation, its raw ceiling)
    "tier_store": ("tier_put", "raw_write"),
    "tier_retrieve": ("tier_get", "raw_read"),
    "engine_store": ("engine_store", "raw_write"),
    "engine_retrieve": ("engine_retrieve", "raw_read"),
}


def _paired(ours: list[float], raw: list[float]) -> dict[str, float]:
    """Throughput ratio ours ÷ raw of each run: min / median / max over runs."""
    import statistics

    per_run = [r / o for o, r in zip(ours, raw)]
    return {"min": min(per_run), "median": statistics.median(per_run), "max": max(per_run)}


def _raw_write(root: Path, frames: list[Any]) -> None:
    """The store ceiling: each frame's bytes to its own file, ``writev`` + ``fsync``."""
    from kvtier.storage.disk import write_all

    for i, parts in enumerate(frames):
        fd = os.open(root / str(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)


def _raw_read(root: Path, sizes: list[int]) -> None:
    """The retrieve ceiling: each file read back with one ``preadv`` into one reused buffer."""
    buf = memoryview(bytearray(max(sizes)))
    for i, size in enumerate(sizes):
        fd = os.open(root / str(i), os.O_RDONLY)
        try:
            if os.preadv(fd, [buf[:size]], 0) != size:
                raise RuntimeError(f"short read of {root / str(i)}")
        finally:
            os.close(fd)


def run_bench(
    path: Path, total_bytes: int, repeat: int, num_layers: int, num_kv_heads: int, head_dim: int,
    dtype: str, chunk_tokens: int,
) -> dict[str, Any]:
    """Measure everything ``repeat`` times; the order of raw / tier / engine rotates between runs so
    that no system always runs first (e.g. right after the previous run's files were discarded)."""
    import time

    import numpy as np
    import torch

    from kvtier.bench.common import Timing, ratio
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.frames import pack_parts, payload_view
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.record import token_record
    from kvtier.storage.disk import DiskTier

    spec = KVSpec(num_layers, num_kv_heads, head_dim, dtype, chunk_tokens)
    n_chunks = max(1, total_bytes // spec.chunk_bytes)
    tokens = np.arange(n_chunks * chunk_tokens, dtype=np.uint32) * 7 + 3
    cfg = load_config(environ={}, overrides={
        "chunk_tokens": chunk_tokens, "store_queue": n_chunks + 1,
        "cpu": {"capacity": (n_chunks + 1) * spec.chunk_bytes},
    })
    model = "bench-disk"
    arr, chunks = Chunker(Namespace(model, spec, tenant=cfg.tenant)).chunks(tokens)
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(spec.chunk_shape(len(tokens)), generator=gen).to(spec.torch_dtype)
    pieces = [kv[:, :, c.start : c.end].contiguous() for c in chunks]
    frames = [pack_parts(token_record(c, arr), p, spec) for c, p in zip(chunks, pieces)]
    sizes = [sum(memoryview(x).nbytes for x in f) for f in frames]
    nbytes = sum(sizes)
    cap = 2 * nbytes + (1 << 20)
    into = torch.empty_like(kv)
    raw_dir, tier_dir, engine_dir = path / "raw", path / "tier", path / "engine"
    shutil.rmtree(path, ignore_errors=True)
    raw_dir.mkdir(parents=True)
    times: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_read", "tier_put", "tier_get",
                                                     "engine_store", "engine_retrieve")}

    def clock(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        result = fn()
        times[name].append(time.perf_counter() - start)
        return result

    tier = DiskTier(tier_dir, cap)
    # One engine for all runs, warmed once, as a serving process would be: its arena is touched.
    engine = CacheEngine(spec, model, cfg, tiers=[(DiskTier(engine_dir, cap), "raw")])
    drop = ""
    try:
        engine.store(tokens, kv)
        engine.storage.flush(600)
        engine.retrieve(tokens, into)
        assert torch.equal(into, kv), "retrieved KV differs from what was stored"

        def engine_store() -> None:
            assert engine.store(tokens, kv) == len(tokens)
            assert engine.storage.flush(600)

        def engine_retrieve() -> None:
            assert engine.retrieve(tokens, into) == len(tokens), "retrieve missed"

        def tier_put() -> None:
            for c, f in zip(chunks, frames):
                tier.put_parts(c.key, f)

        dest = payload_view(torch.empty(spec.chunk_shape(), dtype=spec.torch_dtype))
        assert dest is not None

        def tier_get() -> None:
            assert all(tier.exists([c.key for c in chunks]))  # as the manager does: exists, then reads
            for c in chunks:  # zero-copy into one reused destination, no verification
                assert tier.get_into(c.key, dest) is not None

        writes = {
            "raw": lambda: clock("raw_write", lambda: _raw_write(raw_dir, frames)),
            "tier": lambda: clock("tier_put", tier_put),
            "engine": lambda: clock("engine_store", engine_store),
        }
        reads = {
            "raw": lambda: clock("raw_read", lambda: _raw_read(raw_dir, sizes)),
            "tier": lambda: clock("tier_get", tier_get),
            "engine": lambda: clock("engine_retrieve", engine_retrieve),
        }
        def empty_raw() -> None:
            shutil.rmtree(raw_dir)
            raw_dir.mkdir()

        empty = {
            "raw": empty_raw,
            "tier": tier.clear,
            "engine": engine.clear,  # CPU and disk: the store writes every chunk again
        }
        names = list(writes)
        for run in range(repeat):
            order = names[run % 3 :] + names[: run % 3]
            for name in order:  # freeing blocks (and their discards) is not part of any timing
                empty[name]()
                os.sync()
                writes[name]()
            assert engine.stats()["disk"]["chunks"] == n_chunks, engine.stats()["disk"]
            engine.cpu.clear()  # hits must come from disk
            for name in order:
                drop = _drop_caches([raw_dir, tier_dir, engine_dir])
                reads[name]()
        assert engine.stats()["disk"].get("corrupt", 0) == 0
    finally:
        engine.close()
        tier.close()
        shutil.rmtree(path, ignore_errors=True)

    timing = {k: Timing(v) for k, v in times.items()}
    gb = nbytes / 1e9
    results: dict[str, Any] = {
        "spec": spec.fingerprint(),
        "chunks": n_chunks,
        "bytes": nbytes,
        "repeat": repeat,
        "cache_drop": drop,
        "gbps": {k: t.rate(gb) for k, t in timing.items()},
        "seconds": {k: t.summary() for k, t in timing.items()},
        "ratios": {name: ratio(timing[ours], timing[raw]) for name, (ours, raw) in PAIRS.items()},
        # the same ratio per run (ours and raw measured seconds apart), robust to drifting disk load
        "paired_ratios": {name: _paired(times[ours], times[raw]) for name, (ours, raw) in PAIRS.items()},
        "goal": GOAL,
    }
    results["meets_goal"] = {k: v["median"] >= GOAL for k, v in results["paired_ratios"].items()}
    return results


def register(app: typer.Typer) -> None:
    @app.command("disk")
    def bench_disk(
        path: Annotated[Path, typer.Option(help="Scratch directory on the disk to measure (removed after).")]
        = Path(".kvtier-bench-disk"),
        total: Annotated[str, typer.Option(help="Bytes of KV per run, e.g. 512MiB.")] = "512MiB",
        repeat: Annotated[int, typer.Option(min=3, help="Runs (min/median/max over them).")] = 3,
        layers: Annotated[int, typer.Option(help="KV spec: layers.")] = 32,
        kv_heads: Annotated[int, typer.Option(help="KV spec: KV heads.")] = 8,
        head_dim: Annotated[int, typer.Option(help="KV spec: head dim.")] = 128,
        dtype: Annotated[str, typer.Option(help="KV spec: dtype.")] = "bfloat16",
        chunk_tokens: Annotated[int, typer.Option(help="KV spec: tokens per chunk.")] = 256,
        out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
    ) -> None:
        """Disk tier store/retrieve GB/s ÷ raw write+fsync / cold read of the same bytes."""
        from rich.console import Console
        from rich.table import Table

        from kvtier.bench.common import bar_plot, write_results
        from kvtier.config import parse_bytes

        console = Console()
        with console.status("measuring disk tier"):
            res = run_bench(path, parse_bytes(total), repeat, layers, kv_heads, head_dim, dtype, chunk_tokens)
        json_path = write_results("bench_disk", res, out)
        g = res["gbps"]
        labels = ["store", "retrieve"]
        series = {
            "raw (write+fsync / cold read)": [g["raw_write"]["median"], g["raw_read"]["median"]],
            "DiskTier alone": [g["tier_put"]["median"], g["tier_get"]["median"]],
            "CacheEngine via disk": [g["engine_store"]["median"], g["engine_retrieve"]["median"]],
        }
        keys = {"raw (write+fsync / cold read)": ("raw_write", "raw_read"),
                "DiskTier alone": ("tier_put", "tier_get"),
                "CacheEngine via disk": ("engine_store", "engine_retrieve")}
        errors = {name: ([g[a]["min"], g[b]["min"]], [g[a]["max"], g[b]["max"]]) for name, (a, b) in keys.items()}
        bar_plot(Path(out) / "bench_disk.png",
                 f"disk tier, {res['chunks']} chunks {res['spec']} ({res['cache_drop']})",
                 labels, series, "GB/s (median, min/max whiskers)", errors)
        table = Table(title=f"kvtier bench disk: {res['bytes'] / 1e9:.2f} GB, {res['repeat']} runs")
        for col in ("operation", "GB/s min", "median", "max", "÷ raw per run: min", "median", "max",
                    f"≥ {GOAL}"):
            table.add_column(col, justify="right" if col != "operation" else "left")
        for op, ratio_key in (("raw_write", None), ("raw_read", None), ("tier_put", "tier_store"),
                              ("tier_get", "tier_retrieve"), ("engine_store", "engine_store"),
                              ("engine_retrieve", "engine_retrieve")):
            r = res["paired_ratios"].get(ratio_key) if ratio_key else None
            spread = [f"{r[k]:.2f}" for k in ("min", "median", "max")] if r else ["", "", ""]
            verdict = ("yes" if r["median"] >= GOAL else "NO") if r else ""
            table.add_row(op, f"{g[op]['min']:.2f}", f"{g[op]['median']:.2f}", f"{g[op]['max']:.2f}",
                          *spread, verdict)
        console.print(table)
        console.print(f"wrote {json_path} and {Path(out) / 'bench_disk.png'}")
