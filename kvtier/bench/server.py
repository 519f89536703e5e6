"""``kvtier bench server``: RemoteTier put/get GB/s against a real ``kvtier server`` ÷ raw loopback TCP.

Measured in one run, interleaved so machine noise hits both sides alike:

- ceiling: a plain-socket peer process on loopback (:func:`raw_peer`); "put" streams the same frames to
  it back to back (each received into a buffer of its own, one ack at the end); "get" has it stream
  them back into one preallocated buffer per frame. No framing, no checksum, no per-frame round trip:
  the best a TCP protocol can do with the same distinct bytes.
- ours: :class:`~kvtier.storage.remote.RemoteTier` ``put`` / ``get`` (one round trip per frame, the
  server checks each PUT's structure; the client returns fresh ``bytes``), and the batched
  ``put_many`` (MPUT) / ``get_many`` (MGET: one request, frames streamed back and consumed one by one
  as they arrive, like the manager verifying and copying them) and ``get_many_into`` (MGET with each
  payload received straight into a preallocated destination, as the engine's zero-copy path does).

Frames are real wire frames of random bf16 KV (SmolLM2-135M geometry, raw codec); the default, 32
chunks of 256 tokens, is an 8K-token prompt (~189 MB).
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from kvtier.procs import Child

OPS = ("put", "get", "put_many", "get_many", "get_many_into")

# The ceiling's other end, holding ``count`` frames of ``size`` bytes in buffers of their own (distinct
# memory, as a cache keeps distinct chunks): ``P<n>`` receives frames 0..n-1 into them and acks one
# byte; ``G<n>`` sends frames 0..n-1 back.
SINK = r"""
import socket, struct, sys
size, count = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
frames = [memoryview(bytearray(size)) for _ in range(count)]
cmd = bytearray(5)
def exact(v):
    while len(v):
        n = conn.recv_into(v)
        if n == 0:
            sys.exit(0)
        v = v[n:]
while True:
    exact(memoryview(cmd))
    n = struct.unpack_from("<I", cmd, 1)[0]
    if cmd[0] == ord("P"):
        for i in range(n):
            exact(frames[i])
        conn.sendall(b"k")
    else:
        for i in range(n):
            conn.sendall(frames[i])
"""


@contextlib.contextmanager
def raw_peer(frames: list[bytes]) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """The raw loopback TCP ceiling of ``frames``: yields ``(put, get)``.

    ``put`` streams the frames to a plain-socket child (:data:`SINK`) that receives each into a buffer of
    its own and acks once; ``get`` has it stream them back into this process's own preallocated buffers,
    one per frame. No framing, checksum or per-frame round trip. Distinct buffers on both sides: one
    reused frame-sized buffer stays in the CPU cache and made the ceiling ~1.3x faster than moving the
    same number of distinct bytes (measured at stop 21). The child holds the frames from the start."""
    import struct

    size = len(frames[0])
    with process([sys.executable, "-c", SINK, str(size), str(len(frames))], r"^(\d+)$") as port:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        into = [memoryview(bytearray(size)) for _ in frames]
        ack = memoryview(bytearray(1))

        def put() -> None:
            raw.sendall(b"P" + struct.pack("<I", len(frames)))
            for f in frames:
                raw.sendall(f)
            exact(raw, ack)

        def get() -> None:
            raw.sendall(b"G" + struct.pack("<I", len(frames)))
            for view in into:
                exact(raw, view)

        try:
            put()
            get()
            if any(bytes(v) != f for v, f in zip(into, frames, strict=True)):
                raise RuntimeError("the raw TCP peer returned different bytes")
            yield put, get
        finally:
            raw.close()


@contextlib.contextmanager
def process(args: list[str], pattern: str) -> Iterator[int]:
    """Start ``args``; yield the port (group 1 of ``pattern``) of its first matching stdout line; stop it."""
    with Child(args) as child:
        yield int(child.expect(pattern, 60).group(1))


def kvtier_server(capacity: int) -> contextlib.AbstractContextManager[int]:
    """A throwaway ``kvtier server`` on a free loopback port holding ``capacity`` bytes; yields the port."""
    return process([sys.executable, "-m", "kvtier.server", "--port", "0", "--capacity", str(capacity),
                     "--log-level", "warning"], _SERVER_PORT)


_SERVER_PORT = r"listening on \S+:(\d+)"


def exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("sink closed")
        view = view[n:]


def run(chunk_tokens: int = 256, chunks: int = 32, repeat: int = 5, out_dir: str = "results",
        show: bool = True) -> dict[str, Any]:

    import numpy as np
    import torch

    from kvtier import wire
    from kvtier.bench.common import Report, interleaved
    from kvtier.frames import pack
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.record import token_record
    from kvtier.storage.remote import RemoteTier

    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16", chunk_tokens=chunk_tokens)
    tokens = np.arange(chunks * chunk_tokens, dtype=np.uint32)
    _arr, chunk_list = Chunker(Namespace("bench-server", spec)).chunks(tokens)
    kv = torch.randn(spec.chunk_shape(chunk_tokens)).to(spec.torch_dtype)
    frames = [pack(token_record(c, tokens), kv, spec) for c in chunk_list]
    keys = [c.key for c in chunk_list]
    size = len(frames[0])
    if any(len(f) != size for f in frames):
        raise RuntimeError("frames differ in size")
    nbytes = size * len(frames)
    gb = nbytes / 1e9
    capacity = 4 * nbytes + (64 << 20)
    server_cmd = [sys.executable, "-m", "kvtier.server", "--port", "0", "--capacity", str(capacity),
                  "--log-level", "warning"]

    with process(server_cmd, _SERVER_PORT) as port, raw_peer(frames) as (raw_put, raw_get):
        tier = RemoteTier("127.0.0.1", port, timeout_s=30.0, pool_size=1)

        def ours_put() -> None:
            for k, f in zip(keys, frames, strict=True):
                tier.put(k, f)

        def ours_get() -> None:
            for k in keys:
                if tier.get(k) is None:
                    raise RuntimeError("server lost a frame during the benchmark")

        items = [(k, (f,)) for k, f in zip(keys, frames, strict=True)]

        def ours_put_many() -> None:
            refused = tier.stats().get("puts_refused", 0)
            tier.put_many(items)
            if tier.stats().get("puts_refused", 0) != refused:
                raise RuntimeError("server refused frames during the benchmark")

        def ours_get_many() -> None:  # consume each frame as it arrives, like the manager decoding it
            if tier.get_each(keys, lambda _i, _frame: None) != len(keys):
                raise RuntimeError("server lost a frame during the benchmark")

        payload_len = wire.read_header(frames[0]).payload_len
        head_len = size - payload_len
        dests = [memoryview(bytearray(payload_len)) for _ in keys]

        def ours_get_many_into() -> None:
            if any(h is None for h in tier.get_many_into(keys, dests)):
                raise RuntimeError("server lost a frame during the benchmark")

        pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "put": (raw_put, ours_put), "get": (raw_get, ours_get),
            "put_many": (raw_put, ours_put_many), "get_many": (raw_get, ours_get_many),
            "get_many_into": (raw_get, ours_get_many_into),
        }
        times = interleaved({f"{side} {op}": fn for op, pair in pairs.items()
                             for side, fn in zip(("raw", "ours"), pair)}, repeat)
        if tier.get_many(keys) != frames or any(bytes(d) != f[head_len:] for d, f in zip(dests, frames, strict=True)):
            raise RuntimeError("RemoteTier returned different bytes than were stored")
        server_stats = tier.server_stats()
        tier.close()

    report = Report("bench_server", f"RemoteTier + kvtier server vs raw loopback TCP, {chunks} frames of "
                    f"{size / 2**20:.2f} MiB", amount=gb, meta={
                        "chunk_tokens": chunk_tokens, "chunks": chunks, "bytes": nbytes, "frame_bytes": size,
                        "repeat": repeat, "server_rss_bytes": server_stats.get("rss_bytes"),
                        "ceiling": "raw loopback TCP stream of the same bytes (plain sockets, recv_into, no framing, "
                                   "distinct buffers both sides)"})
    for op in OPS:
        base = report.add(op, times[f"raw {op}"], series="raw loopback TCP")
        report.add(op, times[f"ours {op}"], series="RemoteTier", vs=base)
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("server")
    def server_cmd(
        chunk_tokens: int = typer.Option(256, help="Tokens per chunk (SmolLM2-shaped bf16 KV)."),
        chunks: int = typer.Option(32, help="Frames moved per timed run (32 x 256 tokens = 8K tokens)."),
        repeat: int = typer.Option(5, min=3, help="Timed runs (min/median/max reported)."),
        quick: bool = typer.Option(False, "--quick", help="8 frames, 3 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """RemoteTier put/get GB/s through a real `kvtier server` ÷ raw loopback TCP of the same bytes."""
        if quick:
            chunks, repeat = 8, 3
        run(chunk_tokens, chunks, repeat, out)
