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


def drop_caches(dirs: list[Path]) -> str:
    """Drop the page cache of the files under ``dirs``; returns how (``drop_caches`` or ``fadvise_dontneed``)."""
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


SERIES = {  # series: (store operation, retrieve operation)
    "raw (write+fsync / cold read)": ("raw_write", "raw_read"),
    "DiskTier alone": ("tier_put", "tier_get"),
    "CacheEngine via disk": ("engine_store", "engine_retrieve"),
}


def raw_write(root: Path, frames: list[Any]) -> None:
    """The store ceiling: each frame's bytes to its own file, ``writev`` + ``fsync``."""
    from kvtier.storage.disk import write_all

    for i, parts in enumerate(frames):
        fd = os.open(root / str(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)


def raw_read(root: Path, sizes: list[int]) -> None:
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
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of every operation over ``repeat`` runs, and what was measured. The order of raw / tier /
    engine rotates between runs so that no system always runs first (e.g. right after the previous run's
    files were discarded)."""
    import time

    import numpy as np
    import torch

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
            "raw": lambda: clock("raw_write", lambda: raw_write(raw_dir, frames)),
            "tier": lambda: clock("tier_put", tier_put),
            "engine": lambda: clock("engine_store", engine_store),
        }
        reads = {
            "raw": lambda: clock("raw_read", lambda: raw_read(raw_dir, sizes)),
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
                drop = drop_caches([raw_dir, tier_dir, engine_dir])
                reads[name]()
        assert engine.stats()["disk"].get("corrupt", 0) == 0
    finally:
        engine.close()
        tier.close()
        shutil.rmtree(path, ignore_errors=True)

    return times, {"spec": spec.fingerprint(), "chunks": n_chunks, "bytes": nbytes, "repeat": repeat,
                   "cache_drop": drop}


def run(path: Path, total_bytes: int, repeat: int, num_layers: int = 32, num_kv_heads: int = 8,
        head_dim: int = 128, dtype: str = "bfloat16", chunk_tokens: int = 256, out_dir: Path | str = "results",
        show: bool = True) -> dict[str, Any]:
    """Measure; write ``bench_disk.json`` / ``.png``; return the record."""
    from kvtier.bench.common import Report, Row

    times, info = run_bench(path, total_bytes, repeat, num_layers, num_kv_heads, head_dim, dtype, chunk_tokens)
    report = Report("bench_disk", f"disk tier, {info['chunks']} chunks of {info['spec']} ({info['cache_drop']})",
                    amount=info["bytes"] / 1e9, goal=GOAL, meta=info)
    raw_store, raw_retrieve = SERIES["raw (write+fsync / cold read)"]
    ceilings: dict[str, Row] = {}
    for series, ops in SERIES.items():
        for label, op, raw in zip(("store", "retrieve"), ops, (raw_store, raw_retrieve)):
            ceilings[op] = report.add(label, times[op], series=series, vs=ceilings.get(raw))
    return report.finish(out_dir, show=show)


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
        quick: Annotated[bool, typer.Option("--quick", help="64 MiB, 3 runs: proves it works, numbers rough.")]
        = False,
        out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
    ) -> None:
        """Disk tier store/retrieve GB/s ÷ raw write+fsync / cold read of the same bytes."""
        from kvtier.config import parse_bytes

        if quick:
            total, repeat = "64MiB", 3
        run(path, parse_bytes(total), repeat, layers, kv_heads, head_dim, dtype, chunk_tokens, out)
