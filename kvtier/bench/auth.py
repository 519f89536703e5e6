"""``kvtier bench auth``: what authenticated chunks cost, on 8K tokens of SmolLM2-shaped bf16 KV.

Two parts, both measured in the same run:

- primitives over one 256-token chunk frame payload (5.9 MB): xxh3-64 (the checksum every frame has),
  BLAKE3 keyed on one thread (what :mod:`kvtier.frame_auth` uses) and with its own threads,
  HMAC-SHA256 and, when ``cryptography`` is installed, the AEADs ChaCha20-Poly1305 and AES-256-GCM;
  ceiling: a plain copy of the same bytes;
- paths with ``auth.secret`` ÷ the same path without, engines alike otherwise, interleaved so drift
  hits both (each run's two timings form a pair; the median of the pair ratios is the headline
  number): CPU tier -> disk (store + write-back flush; fsync as configured, ``--no-fsync`` gives the
  MAC its largest share) and disk -> CPU (retrieve into an empty CPU tier), and the same two against a kvtier
  cache-server process on loopback. The goal is >= 0.9x. Each path also gets the ratio predicted from
  its no-auth rate and the measured MAC rate (``1 / (1 + path GB/s / MAC GB/s)``), a cross-check that
  survives a noisy machine better than the ratio of two noisy timings.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import typer

SECRET = "bench-auth: a tenant secret of decent length"
COPY = "copy (ceiling)"
MAC = "blake3 keyed, 1 thread (used)"
SIDES = ("plain", "auth")


def _primitives(payload: bytes, repeat: int) -> dict[str, list[float]]:
    """Seconds of each primitive over ``payload`` per run (the copy is the ceiling)."""
    import blake3
    import xxhash

    from kvtier.bench.common import interleaved

    key = hashlib.sha256(SECRET.encode()).digest()
    ops: dict[str, Callable[[], object]] = {
        COPY: lambda: bytearray(payload),
        "xxh3-64 checksum": lambda: xxhash.xxh3_64_intdigest(payload),
        MAC: lambda: blake3.blake3(payload, key=key).digest(),
        "blake3 keyed, own threads": lambda: blake3.blake3(payload, key=key, max_threads=blake3.blake3.AUTO)
        .digest(),
        "hmac-sha256": lambda: hmac.new(key, payload, hashlib.sha256).digest(),
    }
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        nonce = os.urandom(12)
        ops["chacha20-poly1305 (AEAD)"] = lambda: ChaCha20Poly1305(key).encrypt(nonce, payload, None)
        ops["aes-256-gcm (AEAD)"] = lambda: AESGCM(key).encrypt(nonce, payload, None)
    except ImportError:  # optional: the dev extra installs it
        pass
    return interleaved(ops, repeat, warmup=2)


def _paths(tokens: int, repeat: int, fsync: bool) -> dict[str, list[float]]:
    """Seconds per run of store (until written) and load (CPU tier emptied), with and without auth, for
    the disk tier and a cache server: keys ``"<path> <op> <side>"``."""
    import numpy as np
    import torch

    from kvtier.bench.common import interleaved
    from kvtier.bench.server import kvtier_server
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.layout import KVSpec

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")  # SmolLM2-135M geometry
    kv = torch.randn(spec.chunk_shape(tokens)).to(spec.torch_dtype)
    ids = np.arange(tokens, dtype=np.uint32) * 3 + 1
    out = torch.empty_like(kv)
    capacity = kv.numel() * kv.element_size() + 4 * spec.chunk_bytes
    times: dict[str, list[float]] = {}
    with kvtier_server(4 * capacity) as port, tempfile.TemporaryDirectory(prefix="kvtier-bench-auth-") as tmp:
        for path_name, tier in (("disk", lambda side: {"disk": {"enabled": True, "path": f"{tmp}/{side}",
                                                                  "fsync": fsync, "capacity": 4 * capacity}}),
                                ("remote", lambda _side: {"remote": {"enabled": True, "port": port,
                                                                       "timeout_s": 30.0}})):
            engines = {}
            ops: dict[str, Callable[[], object]] = {}
            prepare: dict[str, Callable[[], object]] = {}
            for side in SIDES:
                cfg = load_config(environ={}, overrides={
                    "cpu": {"capacity": capacity}, "store_queue": tokens // spec.chunk_tokens + 1, **tier(side),
                    "auth": {"secret": SECRET if side == "auth" else ""}})
                engine = engines[side] = CacheEngine(spec, f"bench-auth-{side}", cfg)  # own keys on one server
                ops[f"{path_name} store {side}"] = functools.partial(_store, engine, ids, kv)
                prepare[f"{path_name} store {side}"] = functools.partial(engine.remove, ids)
                ops[f"{path_name} load {side}"] = functools.partial(_load, engine, ids, out, tokens)
                prepare[f"{path_name} load {side}"] = engine.cpu.clear
            try:
                times.update(interleaved(ops, repeat, prepare=prepare))
                for side, engine in engines.items():
                    engine.cpu.clear()
                    if engine.retrieve(ids, out) != tokens or not torch.equal(out, kv):
                        raise RuntimeError(f"{path_name}/{side}: retrieve returned different bytes")
            finally:
                for engine in engines.values():
                    engine.close()
    return times


def _store(engine: Any, ids: Any, kv: Any) -> None:
    engine.store(ids, kv)
    if not engine.storage.flush(120):
        raise RuntimeError("write-back did not finish")


def _load(engine: Any, ids: Any, out: Any, tokens: int) -> None:
    hit = engine.retrieve(ids, out)
    if hit != tokens:
        raise RuntimeError(f"retrieve hit {hit} of {tokens} tokens")


def run(tokens: int = 8192, repeat: int = 5, out_dir: str = "results", fsync: bool = True,
        show: bool = True) -> dict[str, Any]:
    """Two reports: ``<name>_primitives`` (one chunk, ÷ copy) and ``<name>`` (paths, auth ÷ no auth, with
    the ratio predicted from the MAC rate); ``name`` is ``bench_auth`` or ``bench_auth_nofsync``."""
    from kvtier.bench.common import Report
    from kvtier.layout import KVSpec

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")
    payload = os.urandom(spec.chunk_bytes)
    name = "bench_auth" if fsync else "bench_auth_nofsync"
    prims = Report(f"{name}_primitives", f"One 256-token SmolLM2 bf16 chunk ({len(payload) / 1e6:.1f} MB)",
                   amount=len(payload) / 1e9, meta={"chunk_bytes": len(payload)})
    prim_times = _primitives(payload, max(repeat, 10))
    copy = prims.add(COPY, prim_times.pop(COPY))
    for label, seconds in prim_times.items():
        prims.add(label, seconds, vs=copy)
    mac_gbps = len(payload) / 1e9 / statistics.median(prim_times[MAC])
    nbytes = tokens * spec.bytes_per_token
    paths = Report(name, f"{tokens} tokens bf16 ({nbytes / 1e6:.0f} MB), disk fsync {'on' if fsync else 'off'}: "
                   "auth vs no auth", amount=nbytes / 1e9, meta={
                       "tokens": tokens, "repeat": repeat, "mac_GBps": mac_gbps,
                       "conditions": f"disk fsync {'on' if fsync else 'off'}; server on loopback"})
    times = _paths(tokens, repeat, fsync)
    for path in ("disk", "remote"):
        for op in ("store", "load"):
            plain = paths.add(f"{path} {op}", times[f"{path} {op} plain"], series="no auth")
            plain_gbps = nbytes / 1e9 / statistics.median(plain.seconds)
            # what the MAC alone should cost: a cross-check that survives a noisy machine
            paths.add(f"{path} {op}", times[f"{path} {op} auth"], series="auth", vs=plain,
                      predicted=1 / (1 + plain_gbps / mac_gbps))
    prims.finish(out_dir, show=show)
    return paths.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("auth")
    def auth_cmd(
        tokens: int = typer.Option(8192, help="Tokens of SmolLM2-shaped bf16 KV per path run."),
        repeat: int = typer.Option(5, min=1, help="Timed runs (min/median/max reported)."),
        quick: bool = typer.Option(False, "--quick", help="2,048 tokens, 3 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
        fsync: bool = typer.Option(True, "--fsync/--no-fsync", help="Disk tier fsync (config default: on)."),
    ) -> None:
        """Frame MAC (and AEAD) cost: primitives per chunk ÷ copy, and paths with auth ÷ without."""
        if quick:
            tokens, repeat = 2048, 3
        run(tokens, repeat, out, fsync)
