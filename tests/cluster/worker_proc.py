"""A cluster worker process for the tests: a small CacheEngine + Agent + metrics endpoint.

Usage: ``python worker_proc.py CONTROLLER_URL INSTANCE_ID TOKEN CAPACITY_CHUNKS [DISK_DIR]``.
Prints one JSON line ``{"ready": ...}``, then answers JSON commands read from stdin, one per line
(``store``, ``retrieve``, ``lookup``, ``stats``), with one JSON line each. The KV of a token sequence is
a deterministic function of its token ids and positions, so any process can check retrieved KV exactly.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch

from kvtier.cluster.agent import start_engine
from kvtier.config import load_config
from kvtier.layout import KVSpec
from kvtier.metrics import EngineMetrics

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
MODEL = "test-model"


def expected_kv(tokens: list[int]) -> torch.Tensor:
    """``[layers, 2, T, heads, dim]`` float32 depending on every token id and position."""
    t = torch.tensor(tokens, dtype=torch.float32)
    pos = torch.arange(len(tokens), dtype=torch.float32)
    base = (t * 0.001 + pos * 0.01).view(1, 1, -1, 1, 1)
    grid = torch.arange(SPEC.num_layers * 2 * SPEC.num_kv_heads * SPEC.head_dim, dtype=torch.float32)
    grid = grid.view(SPEC.num_layers, 2, 1, SPEC.num_kv_heads, SPEC.head_dim)
    return (base + grid).contiguous()


def main() -> None:
    url, instance, token, chunks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    disk = sys.argv[5] if len(sys.argv) > 5 else ""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    overrides: dict = {"chunk_tokens": SPEC.chunk_tokens, "cpu": {"capacity": chunks * SPEC.chunk_bytes},
                       "cluster": {"controller_url": url, "instance_id": instance, "token": token, "poll_wait_s": 2.0}}
    if disk:
        overrides["disk"] = {"enabled": True, "path": disk, "fsync": False}
    engine, agent = start_engine(SPEC, MODEL, load_config(environ={}, overrides=overrides))
    metrics = EngineMetrics(engine, sources=[agent.stats])
    metrics_port = metrics.serve(0)
    registered = agent.wait_registered(30)
    print(json.dumps({"ready": registered, "p2p": agent.address, "metrics_port": metrics_port}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        tokens = cmd.get("tokens", [])
        start = time.perf_counter()
        if op == "store":
            out: dict = {"cached": engine.store(tokens, expected_kv(tokens))}
            engine.storage.flush(5.0)
        elif op == "retrieve":
            into = torch.zeros(SPEC.chunk_shape(len(tokens)))
            hit = engine.retrieve(tokens, into)
            equal = bool(torch.equal(into[:, :, :hit], expected_kv(tokens)[:, :, :hit]))
            untouched = bool(torch.all(into[:, :, hit:] == 0))
            out = {"hit": hit, "equal": equal, "untouched": untouched}
        elif op == "lookup":
            out = {"hit": engine.lookup(tokens)}
        elif op == "stats":
            out = {"stats": engine.stats(), "agent": agent.stats()}
        else:
            out = {"error": f"unknown op {op}"}
        out["seconds"] = time.perf_counter() - start
        print(json.dumps(out, default=str), flush=True)
    agent.stop()
    metrics.close()
    engine.close()


if __name__ == "__main__":
    main()
