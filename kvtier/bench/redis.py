"""``kvtier bench redis``: RedisTier put/get GB/s ÷ plain redis-py SET/GET of the same bytes.

The benchmark starts its own ``redis-server`` (loopback, private port, no persistence) and measures, in
the same run and interleaved so drift hits both sides alike:

- ceiling: a plain ``redis.Redis`` client doing ``SET`` / ``GET`` of the complete frames;
- ours: :class:`~kvtier.storage.redis.RedisTier` ``put`` (whole frame), ``put_parts`` (header and
  payload apart, as the StorageManager writes) and ``get`` of the same keys and bytes.

Frames are real wire frames of random KV (raw codec) so sizes match what the engine stores.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer

from kvtier.procs import stop_process

OPS = ("put", "put_parts", "get")


@contextlib.contextmanager
def redis_server(binary: str) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port; yields the port."""
    import socket

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--logfile", f"{workdir}/redis.log"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if probe.ping():
                    break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (see {workdir}/redis.log)") from None
                time.sleep(0.02)
        probe.close()
        yield port
    finally:
        stop_process(proc, 10)
        shutil.rmtree(workdir, ignore_errors=True)


def run(chunk_tokens: int = 256, chunks: int = 16, repeat: int = 5, out_dir: str = "results",
        show: bool = True) -> dict[str, Any]:
    import numpy as np
    import redis
    import torch

    from kvtier.bench.common import Report, interleaved
    from kvtier.errors import ConfigError
    from kvtier.frames import pack_parts
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.record import token_record
    from kvtier.storage.redis import RedisTier

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise ConfigError("kvtier bench redis needs redis-server on PATH (apt-get install redis-server)")
    # SmolLM2-135M geometry in bf16: 30 layers x 3 KV heads x 64 dims -> 23 KiB per token.
    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16", chunk_tokens=chunk_tokens)
    tokens = np.arange(chunks * chunk_tokens, dtype=np.uint32)
    _arr, chunk_list = Chunker(Namespace("bench-redis", spec)).chunks(tokens)
    kv = torch.randn(spec.chunk_shape(chunk_tokens)).to(spec.torch_dtype)
    parts = [pack_parts(token_record(c, tokens), kv, spec) for c in chunk_list]
    frames = [b"".join(p) for p in parts]
    nbytes = sum(len(f) for f in frames)
    gb = nbytes / 1e9

    with redis_server(binary) as port:
        url = f"redis://127.0.0.1:{port}/0"
        tier = RedisTier(url)
        plain = redis.Redis(host="127.0.0.1", port=port)
        names = [tier.key_prefix.encode() + c.key.hex().encode() for c in chunk_list]
        keys = [c.key for c in chunk_list]

        def plain_set() -> None:
            for n, f in zip(names, frames):
                plain.set(n, f)

        def plain_get() -> None:
            for n in names:
                plain.get(n)

        def ours_put() -> None:
            for k, f in zip(keys, frames):
                tier.put(k, f)

        def ours_put_parts() -> None:
            for k, p in zip(keys, parts):
                tier.put_parts(k, p)

        def ours_get() -> None:
            for k in keys:
                tier.get(k)

        pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "put": (plain_set, ours_put), "put_parts": (plain_set, ours_put_parts), "get": (plain_get, ours_get),
        }
        times = interleaved({f"{side} {op}": fn for op, pair in pairs.items()
                             for side, fn in zip(("plain", "ours"), pair)}, repeat)
        got = [tier.get(k) for k in keys]
        if got != frames:
            raise RuntimeError("RedisTier.get returned different bytes than were stored")
        tier.clear()
        tier.close()
        plain.close()

    report = Report("bench_redis", f"RedisTier vs plain redis-py SET / GET, {chunks} frames of "
                    f"{len(frames[0]) / 2**20:.1f} MiB", amount=gb, meta={
                        "chunk_tokens": chunk_tokens, "chunks": chunks, "bytes": nbytes,
                        "frame_bytes": len(frames[0]), "repeat": repeat, "server": binary})
    for op in OPS:
        base = report.add(op, times[f"plain {op}"], series="plain redis-py")
        report.add(op, times[f"ours {op}"], series="RedisTier", vs=base)
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("redis")
    def redis_cmd(
        chunk_tokens: int = typer.Option(256, help="Tokens per chunk (SmolLM2-shaped bf16 KV)."),
        chunks: int = typer.Option(16, help="Frames moved per timed run."),
        repeat: int = typer.Option(5, min=3, help="Timed runs (min/median/max reported)."),
        quick: bool = typer.Option(False, "--quick", help="4 frames, 3 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """RedisTier put/get GB/s ÷ plain redis-py SET/GET of the same bytes (own redis-server)."""
        if quick:
            chunks, repeat = 4, 3
        run(chunk_tokens, chunks, repeat, out)
