"""Child of ``kvtier bench sglang storage --baseline NAME=DIR``: the SGLang backend of another kvtier
checkout (``DIR`` on ``PYTHONPATH``, e.g. ``git archive c3c4a65 kvtier | tar -x -C DIR``) timing the
benchmark's batch on commands from stdin, so that the parent interleaves it run by run with its own.

Loaded by file path (see :func:`kvtier.bench.sglang.baseline_argv`), never imported as part of this
package: it must run against any kvtier version that has ``kvtier.integrations.sglang.KvtierStorage``,
so it imports nothing else of kvtier and uses only what every version's backend takes (the v1 calls,
``clear``, ``close``, a disk tier in the extra config; each version's own default object size).

Protocol (one line each): it prints ``ready <kvtier.__file__>`` once, then answers each ``write`` or
``read`` line with ``done <op> <seconds> <all pages ok>``; end of input or ``quit`` ends it. ``write``
clears the backend first (untimed), as the parent's own write rows do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="kvtier-sglang-baseline")
    parser.add_argument("--shape", required=True, help="JSON: layers, heads, dim, pages, page_tokens")
    parser.add_argument("--keys", required=True, help="file with one SGLang page hash per line")
    parser.add_argument("--disk", required=True)
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import kvtier
    from kvtier.integrations.sglang import KvtierStorage

    shape = json.loads(args.shape)
    tokens = shape["pages"] * shape["page_tokens"]
    buffer = torch.randn((2, shape["layers"], tokens, shape["heads"], shape["dim"]),
                         generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pool = SimpleNamespace(layout="layer_first", kv_buffer=buffer, page_size=shape["page_tokens"],
                           layer_num=shape["layers"], head_num=shape["heads"], head_dim=shape["dim"],
                           dtype=torch.bfloat16)
    config = SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=False, model_name="bench",
                             extra_config={"kvtier": {"disk": {"enabled": True, "path": args.disk,
                                                               "fsync": args.fsync}}})
    storage = KvtierStorage(config)
    storage.register_mem_pool_host(pool)
    with open(args.keys, encoding="utf-8") as f:
        keys = f.read().split()
    slots = torch.arange(tokens)
    first_call = SimpleNamespace(prefix_keys=None, extra_info=None)  # SGLang's call at a sequence start
    print(f"ready {kvtier.__file__}", flush=True)
    for line in sys.stdin:
        op = line.strip()
        if op == "quit":
            break
        if op not in ("write", "read"):
            raise SystemExit(f"kvtier-sglang-baseline: unknown command {op!r} (write, read or quit)")
        if op == "write":
            storage.clear()
        call = storage.batch_set_v1 if op == "write" else storage.batch_get_v1
        start = time.perf_counter()
        ok = call(keys, slots, first_call)
        print(f"done {op} {time.perf_counter() - start:.9f} {all(ok)}", flush=True)
    storage.close()
