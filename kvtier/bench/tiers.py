"""``kvtier bench tiers``: CacheEngine store / retrieve through each lower tier ÷ that tier's raw ceiling.

What users wait on when the CPU tier does not hold their prefix: ``CacheEngine.retrieve`` of a long
prompt (8,192 bf16 tokens of SmolLM2-135M geometry by default, 32 chunks of 256 tokens, ~189 MB) with
the CPU tier emptied, so every chunk comes from the lower tier (read, verified, promoted, copied out),
and ``CacheEngine.store`` until every chunk is written to that tier (copy in, frame, write-back, flush).
The retrieve is measured twice: with promotion (``cpu.promote``, the default: every chunk is admitted to
the CPU tier, then copied out) and without (``retrieve, no promotion``: read for that retrieve only,
straight into the destination tensor where the tier can), against the same ceiling.

CPU per side: for every timed run, the CPU time of this process (the engine, or the ceiling's client)
and of its peer process (cache server / raw sink, redis-server), summed over their threads from
``/proc/<pid>/task/*/schedstat``; min/median/max in ms go into the JSON (``cpu_ms``).

Ceilings, on the same frames, measured in the same run and interleaved with ours (the order alternates
every run, so the machine's drift hits both sides alike; ratios are per run pair, min/median/max):

- ``server``: a plain-socket peer on loopback streaming the frames back to back into one preallocated
  buffer per frame (read) / receiving each into a buffer of its own (write): raw loopback TCP, no
  framing, no checksum, no round trips (:func:`kvtier.bench.server.raw_peer`);
- ``redis``: a plain ``redis.Redis`` client doing one pipelined batch of ``GET`` / ``SET``;
- ``disk``: each frame ``write`` + ``fsync`` to its own file / read back cold (page cache dropped before
  every read, ours and the ceiling's alike);
- ``mooncake``: a plain Mooncake client's ``put_parts`` / ``get`` of the frames on the same master.

Every process (cache server, sink, redis-server, mooncake_master) is private, on loopback, and stopped
at the end; a tier that cannot start here (no redis-server, no Mooncake) is skipped and said so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

TIERS = ("server", "redis", "disk", "mooncake")
GOAL = 0.8
DIRECT = "retrieve, no promotion"
OPS = (("retrieve", "ceiling read"), (DIRECT, "ceiling read"), ("store", "ceiling write"))


class Unavailable(Exception):
    """The tier cannot run on this machine (a missing binary or package); the benchmark skips it."""


def _nothing() -> None:
    pass


@dataclass
class Ceiling:
    """A lower tier for the engine and the raw reads / writes of the same frames it is measured against.

    ``before_read`` runs before every timed read, ours and the ceiling's (e.g. dropping the page cache);
    ``before_write`` before every ceiling write (e.g. removing what the previous one wrote). ``peer`` /
    ``ceiling_peer``: the process on the other end of our tier / of the ceiling, for CPU accounting."""

    tier: Any
    read: Callable[[], None]
    write: Callable[[], None]
    what: str
    before_read: Callable[[], object] = _nothing
    before_write: Callable[[], None] = _nothing
    peer: int | None = None
    ceiling_peer: int | None = None


def _child(marker: str) -> int | None:
    """The pid of this process's child whose command line contains ``marker``."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    if marker in cmdline.decode(errors="replace"):
                        return int(pid)
    return None


def cpu_ns(pid: int | str | None) -> int:
    """CPU nanoseconds used so far by every live thread of process ``pid`` ("self": this one); 0 for
    ``None`` or a process that is gone."""
    if pid is None:
        return 0
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


@contextlib.contextmanager
def _server(frames: list[bytes], _work: Path) -> Iterator[Ceiling]:
    from kvtier.bench.server import kvtier_server, raw_peer
    from kvtier.storage.remote import RemoteTier

    size = len(frames[0])
    with kvtier_server(3 * size * len(frames) + (64 << 20)) as port, raw_peer(frames) as (put, get):
        yield Ceiling(RemoteTier("127.0.0.1", port, timeout_s=30.0), get, put,
                      "raw loopback TCP stream of the same bytes (distinct buffers both sides)",
                      peer=_child("kvtier.server"), ceiling_peer=_child("import socket, struct"))


@contextlib.contextmanager
def _redis(frames: list[bytes], _work: Path) -> Iterator[Ceiling]:
    import redis

    from kvtier.bench.redis import redis_server
    from kvtier.storage.redis import RedisTier

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise Unavailable("no redis-server on PATH")
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
        server = _child(os.path.basename(binary))
        try:
            yield Ceiling(RedisTier(f"redis://127.0.0.1:{port}/0"), read, write,
                          "pipelined plain redis-py GET / SET of the same frames", peer=server, ceiling_peer=server)
        finally:
            plain.close()


@contextlib.contextmanager
def _disk(frames: list[bytes], work: Path) -> Iterator[Ceiling]:
    from kvtier.bench.disk import drop_caches, raw_read, raw_write
    from kvtier.storage.disk import DiskTier

    raw_dir, tier_dir = work / "raw", work / "tier"
    raw_dir.mkdir()
    sizes = [len(f) for f in frames]

    def empty_raw() -> None:
        shutil.rmtree(raw_dir)
        raw_dir.mkdir()
        os.sync()  # freeing the previous run's blocks is not part of the timing

    raw_write(raw_dir, [[f] for f in frames])
    tier = DiskTier(tier_dir, 2 * sum(sizes) + (1 << 20))
    yield Ceiling(tier, lambda: raw_read(raw_dir, sizes), lambda: raw_write(raw_dir, [[f] for f in frames]),
                  "write + fsync of each frame to its own file / cold read (page cache dropped)",
                  before_read=lambda: drop_caches([raw_dir, tier_dir]), before_write=empty_raw)


@contextlib.contextmanager
def _mooncake(frames: list[bytes], work: Path) -> Iterator[Ceiling]:
    from kvtier.storage.mooncake import MooncakeTier
    from kvtier.storage.mooncake_master import MooncakeMaster

    segment = 3 * sum(len(f) for f in frames) + (256 << 20)  # per client; a leased object may outlive its remove
    try:
        master = MooncakeMaster(work / "mooncake.log")
    except RuntimeError as exc:  # the package or its native libraries are missing
        raise Unavailable(str(exc)) from exc
    with master as m:
        from mooncake.store import MooncakeDistributedStore

        plain = MooncakeDistributedStore()
        if plain.setup("127.0.0.1", m.metadata_server, segment, 256 << 20, "tcp", "", m.master) != 0:
            raise RuntimeError("a plain Mooncake client could not connect to the private master")
        # every write under new names: Mooncake keeps an existing key's object (a put of it is a no-op)
        # and may refuse to remove an object a reader leased, so reusing names could time nothing
        generation = [0]

        def names() -> list[str]:
            return [f"ceiling:{generation[0]}:{i}" for i in range(len(frames))]

        def read() -> None:
            if not all(plain.get(n) for n in names()):
                raise RuntimeError("mooncake lost a ceiling frame")

        def write() -> None:
            generation[0] += 1
            if any(plain.put_parts(n, f) != 0 for n, f in zip(names(), frames)):
                raise RuntimeError("mooncake refused a ceiling frame")

        def remove() -> None:  # the previous generation, so the store does not fill up
            for n in names():
                plain.remove(n)

        tier = MooncakeTier(m.master, m.metadata_server, segment=segment)
        try:
            if not tier.wait_ready(60):
                raise RuntimeError("the Mooncake tier did not connect to the private master")
            write()
            yield Ceiling(tier, read, write, "plain Mooncake client put_parts / get of the same frames",
                          before_write=remove)
        finally:
            tier.close()
            plain.close()


CEILINGS = {"server": _server, "redis": _redis, "disk": _disk, "mooncake": _mooncake}


def measure(name: str, tokens: int, repeat: int, work: Path) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of every timed run of ``name``'s five operations, and the engines' counters and CPU."""
    import numpy as np
    import torch

    from kvtier import frames as wire_frames
    from kvtier.bench.common import interleaved
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.record import token_record

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")  # SmolLM2-135M geometry
    ids = np.arange(tokens, dtype=np.uint32) * 7 + 3
    model = f"bench-tiers-{name}"
    n_chunks = tokens // spec.chunk_tokens
    cfg = load_config(environ={}, overrides={"store_queue": n_chunks + 2,
                                             "cpu": {"capacity": (n_chunks + 2) * spec.chunk_bytes}})
    kv = torch.randn(spec.chunk_shape(tokens), generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    into = torch.empty_like(kv)
    arr, chunks = Chunker(Namespace(model, spec, tenant=cfg.tenant)).chunks(ids)
    frames = [wire_frames.pack(token_record(c, arr), kv[:, :, c.start : c.end].contiguous(), spec) for c in chunks]
    with CEILINGS[name](frames, work) as ceiling:
        engine = CacheEngine(spec, model, cfg, tiers=[(ceiling.tier, "raw")])
        # the same tier without promotion (an engine of its own: config is immutable)
        direct = CacheEngine(spec, model, cfg.model_copy(update={"cpu": cfg.cpu.model_copy(update={"promote": False})}),
                             tiers=[(ceiling.tier, "raw")])
        try:
            current = [ids]

            def retrieve(e: CacheEngine = engine) -> None:
                if e.retrieve(current[0], into) != tokens:
                    raise RuntimeError(f"retrieve missed: {e.stats()}")

            def store() -> None:
                if engine.store(current[0], kv) != tokens or not engine.storage.flush(600):
                    raise RuntimeError(f"store did not complete: {engine.stats()}")

            def before_store() -> None:
                engine.cpu.clear()
                engine.storage.clear()
                # new token ids, so new keys: no tier can skip a put of a key it still holds (Mooncake
                # keeps an existing key's object, and may not remove one a reader leased)
                current[0] = current[0] + tokens

            def before_retrieve() -> None:
                engine.cpu.clear()  # every chunk comes from the lower tier
                ceiling.before_read()

            ops: dict[str, Callable[[], object]] = {
                "store": store, "ceiling write": ceiling.write, "retrieve": retrieve,
                "ceiling read": ceiling.read, DIRECT: lambda: retrieve(direct)}
            prepare = {"store": before_store, "ceiling write": ceiling.before_write,
                       "retrieve": before_retrieve, "ceiling read": ceiling.before_read, DIRECT: ceiling.before_read}
            peers = {op: ceiling.ceiling_peer if op.startswith("ceiling") else ceiling.peer for op in ops}
            cpu: dict[str, list[tuple[int, int]]] = {op: [] for op in ops}
            started: dict[str, tuple[int, int]] = {}

            def before(op: str) -> Callable[[], None]:
                def go() -> None:
                    prepare[op]()
                    started[op] = (cpu_ns("self"), cpu_ns(peers[op]))
                return go

            def timed(op: str) -> Callable[[], None]:
                def go() -> None:
                    ops[op]()
                    ours, peer = started[op]
                    cpu[op].append((cpu_ns("self") - ours, cpu_ns(peers[op]) - peer))
                return go

            times = interleaved({op: timed(op) for op in ops}, repeat, prepare={op: before(op) for op in ops})
            for e in (engine, direct):
                e.cpu.clear()
                into.zero_()
                retrieve(e)
                if not torch.equal(into, kv):
                    raise RuntimeError("retrieve returned different bytes than were stored")
            if len(direct.cpu):
                raise RuntimeError("the engine without promotion admitted chunks to its CPU tier")
            stats, direct_stats = engine.stats(), direct.stats()
        finally:
            direct.close()
            engine.close()
    lower = {k: v for k, v in stats.get(ceiling.tier.name, {}).items() if isinstance(v, int | float)}
    return times, {"ceiling": ceiling.what, "bytes": sum(len(f) for f in frames), "chunks": len(chunks),
                   "engine_counters": stats["engine"], "no_promotion_counters": direct_stats["engine"],
                   "tier_counters": lower,
                   "cpu_ms": {op: {"client": _spread([c for c, _p in runs[-repeat:]]),
                                   "peer": _spread([p for _c, p in runs[-repeat:]]) if peers[op] else None}
                              for op, runs in cpu.items()}}


def _spread(ns: list[int]) -> dict[str, float]:
    ms = sorted(n / 1e6 for n in ns)
    return {"min": round(ms[0], 1), "median": round(ms[len(ms) // 2], 1), "max": round(ms[-1], 1)}


def run(tiers: tuple[str, ...] = TIERS, tokens: int = 8192, repeat: int = 5, out_dir: str = "results",
        show: bool = True) -> dict[str, Any]:
    """Measure each of ``tiers``; write ``bench_tiers.json`` / ``.png``; return the record."""
    from kvtier.bench.common import Report
    from kvtier.errors import ConfigError

    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise ConfigError(f"kvtier bench tiers: --tier {','.join(unknown) or '(none)'}: "
                          f"expected some of {', '.join(TIERS)}")
    measured: dict[str, tuple[dict[str, list[float]], dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for name in tiers:
        with tempfile.TemporaryDirectory(prefix=f"kvtier-bench-tiers-{name}-") as work:
            try:
                measured[name] = measure(name, tokens, repeat, Path(work))
            except Unavailable as exc:
                typer.echo(f"{name} skipped: {exc}", err=True)
                skipped[name] = str(exc)
    if not measured:
        raise ConfigError(f"kvtier bench tiers: no tier could run here ({skipped})")
    nbytes = next(iter(measured.values()))[1]["bytes"]
    report = Report("bench_tiers", f"CacheEngine via each tier, {tokens} bf16 tokens ({nbytes / 1e6:.0f} MB), "
                    "CPU tier emptied", amount=nbytes / 1e9, goal=GOAL,
                    meta={"tokens": tokens, "repeat": repeat, "skipped": skipped,
                          "tiers": {n: info for n, (_t, info) in measured.items()}})
    for name, (times, info) in measured.items():
        bases: dict[str, Any] = {}
        for ours, ceiling in OPS:
            if ceiling not in bases:
                bases[ceiling] = report.add(ceiling, times[ceiling], series=name)
            report.add(f"engine {ours}", times[ours], series=name, vs=bases[ceiling])
        if show:
            for op, use in info["cpu_ms"].items():
                peer = f", peer {use['peer']['median']:.1f} ms" if use["peer"] else ""
                typer.echo(f"{name} {op}: CPU median this process {use['client']['median']:.1f} ms{peer}")
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("tiers")
    def tiers_cmd(
        tier: str = typer.Option(",".join(TIERS), help="Comma-separated lower tiers: server, redis, disk, mooncake."),
        tokens: int = typer.Option(8192, help="Tokens of SmolLM2-shaped bf16 KV per run (whole 256-token chunks)."),
        repeat: int = typer.Option(5, min=3, help="Timed runs (min/median/max reported)."),
        quick: bool = typer.Option(False, "--quick", help="2,048 tokens, 3 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """CacheEngine retrieve (CPU tier emptied) / store-until-written per lower tier ÷ its raw ceiling."""
        if quick:
            tokens, repeat = 2048, 3
        run(tuple(t.strip() for t in tier.split(",") if t.strip()), tokens, repeat, out)
