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

import hashlib
import hmac
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import typer

SECRET = "bench-auth: a tenant secret of decent length"


def _primitives(payload: bytes, repeat: int) -> dict[str, Any]:
    import blake3
    import xxhash

    from kvtier.bench.common import Timing, ratio, time_runs

    key = hashlib.sha256(SECRET.encode()).digest()
    ops: dict[str, Callable[[], object]] = {
        "copy (ceiling)": lambda: bytearray(payload),
        "xxh3-64 checksum": lambda: xxhash.xxh3_64_intdigest(payload),
        "blake3 keyed, 1 thread (used)": lambda: blake3.blake3(payload, key=key).digest(),
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
    gb = len(payload) / 1e9
    timings: dict[str, Timing] = {name: time_runs(fn, repeat=repeat, warmup=2) for name, fn in ops.items()}
    ceiling = timings["copy (ceiling)"]
    return {name: {**t.summary(), "GBps": t.rate(gb), "ratio_vs_copy": ratio(t, ceiling)}
            for name, t in timings.items()}


def _server(capacity: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.server", "--port", "0", "--capacity", str(capacity),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc, int(line.split("listening on", 1)[1].split()[0].rsplit(":", 1)[1])
    raise RuntimeError("kvtier server did not start")


def _paths(tokens: int, repeat: int, fsync: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from kvtier.bench.common import Timing, ratio, stop_process
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine
    from kvtier.layout import KVSpec

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")  # SmolLM2-135M geometry
    kv = torch.randn(spec.chunk_shape(tokens)).to(spec.torch_dtype)
    ids = np.arange(tokens, dtype=np.uint32) * 3 + 1
    nbytes = kv.numel() * kv.element_size()
    gb = nbytes / 1e9
    out = torch.empty_like(kv)
    capacity = nbytes + 4 * spec.chunk_bytes
    server, port = _server(4 * capacity)
    result: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="kvtier-bench-auth-") as tmp:
            for path_name, tier in (("disk", lambda side: {"disk": {"enabled": True, "path": f"{tmp}/{side}",
                                                                      "fsync": fsync, "capacity": 4 * capacity}}),
                                    ("remote", lambda _side: {"remote": {"enabled": True, "port": port,
                                                                           "timeout_s": 30.0}})):
                engines = {}
                for side in ("plain", "auth"):
                    cfg = load_config(environ={}, overrides={
                        "cpu": {"capacity": capacity}, "store_queue": tokens // spec.chunk_tokens + 1, **tier(side),
                        "auth": {"secret": SECRET if side == "auth" else ""}})
                    engines[side] = CacheEngine(spec, f"bench-auth-{side}", cfg)  # own keys on a shared server
                runs: dict[str, dict[str, list[float]]] = {op: {"plain": [], "auth": []} for op in ("store", "load")}
                try:
                    for i in range(repeat + 1):  # run 0 warms up; the sides alternate who goes first
                        order = ("plain", "auth") if i % 2 == 0 else ("auth", "plain")
                        for side in order:
                            engine = engines[side]
                            engine.remove(ids)
                            start = time.perf_counter()
                            engine.store(ids, kv)
                            if not engine.storage.flush(120):
                                raise RuntimeError("write-back did not finish")
                            store_s = time.perf_counter() - start
                            engine.cpu.clear()
                            start = time.perf_counter()
                            hit = engine.retrieve(ids, out)
                            load_s = time.perf_counter() - start
                            if hit != tokens or not torch.equal(out, kv):
                                raise RuntimeError(f"{path_name}/{side}: retrieve hit {hit} of {tokens} tokens")
                            if i:
                                runs["store"][side].append(store_s)
                                runs["load"][side].append(load_s)
                finally:
                    for engine in engines.values():
                        engine.close()
                for op, sides in runs.items():
                    plain, auth = Timing(sides["plain"]), Timing(sides["auth"])
                    pairs = sorted(p / a for p, a in zip(sides["plain"], sides["auth"]))  # same run, back to back
                    result[f"{path_name}_{op}"] = {
                        "plain": {**plain.summary(), "GBps": plain.rate(gb)},
                        "auth": {**auth.summary(), "GBps": auth.rate(gb)},
                        "ratio_auth_vs_plain": ratio(auth, plain),
                        "ratio_per_pair": {"min": pairs[0], "median": statistics.median(pairs), "max": pairs[-1]},
                    }
    finally:
        stop_process(server)
    result["bytes"] = nbytes
    return result


def run(tokens: int = 8192, repeat: int = 5, out_dir: str = "results", fsync: bool = True) -> dict[str, Any]:
    from kvtier.bench.common import bar_plot, write_results
    from kvtier.layout import KVSpec

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")
    payload = os.urandom(spec.chunk_bytes)
    result: dict[str, Any] = {
        "tokens": tokens, "chunk_bytes": spec.chunk_bytes, "repeat": repeat, "cpus": os.cpu_count(),
        "primitives_one_chunk": _primitives(payload, max(repeat, 10)),
        "paths": _paths(tokens, repeat, fsync),
        "conditions": f"disk fsync {'on' if fsync else 'off'}; server on loopback; shared 2-core machine",
    }
    mac_gbps = result["primitives_one_chunk"]["blake3 keyed, 1 thread (used)"]["GBps"]["median"]
    for entry in result["paths"].values():  # what the MAC alone should cost: noise-free cross-check
        if isinstance(entry, dict):
            entry["ratio_predicted_from_mac_rate"] = 1 / (1 + entry["plain"]["GBps"]["median"] / mac_gbps)
    name = "bench_auth" if fsync else "bench_auth_nofsync"
    write_results(name, result, out_dir)
    prims = result["primitives_one_chunk"]
    bar_plot(f"{out_dir}/{name}_primitives.png", "One 256-token SmolLM2 bf16 chunk (5.9 MB)", list(prims),
             {"GB/s (median)": [p["GBps"]["median"] for p in prims.values()]}, "GB/s",
             errors={"GB/s (median)": ([p["GBps"]["min"] for p in prims.values()],
                                       [p["GBps"]["max"] for p in prims.values()])})
    paths = {k: v for k, v in result["paths"].items() if isinstance(v, dict)}
    bar_plot(f"{out_dir}/{name}.png", f"{tokens} tokens bf16, fsync {'on' if fsync else 'off'}: auth ÷ no auth",
             list(paths),
             {"measured (median of pairs)": [p["ratio_per_pair"]["median"] for p in paths.values()],
              "predicted from MAC rate": [p["ratio_predicted_from_mac_rate"] for p in paths.values()]},
             "× of no-auth",
             errors={"measured (median of pairs)": ([p["ratio_per_pair"]["min"] for p in paths.values()],
                                                    [p["ratio_per_pair"]["max"] for p in paths.values()])})
    return result


def register(app: typer.Typer) -> None:
    @app.command("auth")
    def auth_cmd(
        tokens: int = typer.Option(8192, help="Tokens of SmolLM2-shaped bf16 KV per path run."),
        repeat: int = typer.Option(5, help="Timed runs (min/median/max reported)."),
        out: str = typer.Option("results", help="Output directory."),
        fsync: bool = typer.Option(True, "--fsync/--no-fsync", help="Disk tier fsync (config default: on)."),
    ) -> None:
        """Frame MAC (and AEAD) cost: primitives per chunk, and paths with auth ÷ without."""
        from rich.console import Console
        from rich.table import Table

        r = run(tokens, repeat, out, fsync)
        console = Console()
        table = Table(title=f"Primitives over one chunk ({r['chunk_bytes'] / 1e6:.1f} MB)")
        for col in ("primitive", "GB/s min", "GB/s median", "GB/s max", "÷ copy (median)"):
            table.add_column(col)
        for name, p in r["primitives_one_chunk"].items():
            g = p["GBps"]
            table.add_row(name, f"{g['min']:.2f}", f"{g['median']:.2f}", f"{g['max']:.2f}",
                          f"{p['ratio_vs_copy']['median']:.2f}x")
        console.print(table)
        table = Table(title=f"Paths, {tokens} tokens ({r['paths']['bytes'] / 1e6:.0f} MB): auth ÷ no auth")
        for col in ("path", "no auth GB/s", "auth GB/s", "pair ratio median", "min", "max", "predicted"):
            table.add_column(col)
        for name, p in r["paths"].items():
            if not isinstance(p, dict):
                continue
            q = p["ratio_per_pair"]
            table.add_row(name, f"{p['plain']['GBps']['median']:.2f}", f"{p['auth']['GBps']['median']:.2f}",
                          f"{q['median']:.2f}x", f"{q['min']:.2f}x", f"{q['max']:.2f}x",
                          f"{p['ratio_predicted_from_mac_rate']:.2f}x")
        console.print(table)
