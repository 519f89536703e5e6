"""FsTier: a directory shared by several processes; atomic publishes, no torn reads, vanishing files."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.frames import pack
from kvtier.keys import Chunk, Chunker, Namespace
from kvtier.layout import KVSpec
from kvtier.procs import Child
from kvtier.record import token_record
from kvtier.storage.disk import QUARANTINE, chunk_path
from kvtier.storage.fs import FsTier

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)


def frames(n: int, seed: int = 0) -> list[tuple[Chunk, bytes]]:
    arr, chunks = Chunker(Namespace("fs", SPEC)).chunks(np.arange(n * 16) + seed)
    return [(c, pack(token_record(c, arr), torch.randn(SPEC.chunk_shape()), SPEC)) for c in chunks]


def test_round_trip_delete_clear(tmp_path: Path) -> None:
    t = FsTier(tmp_path)
    items = frames(5)
    for i, (c, f) in enumerate(items):
        t.put_parts(c.key, (f[:50], memoryview(f)[50:])) if i % 2 else t.put(c.key, f)
    assert t.exists([c.key for c, _ in items]) == [True] * 5
    assert all(t.get(c.key) == f for c, f in items)
    other = FsTier(tmp_path)  # no in-memory index: a second instance sees everything at once
    assert all(other.get(c.key) == f for c, f in items)
    assert t.delete(items[0][0].key) and not other.delete(items[0][0].key)
    assert other.exists([items[0][0].key]) == [False]
    assert t.clear() == 4 and not any(other.exists([c.key for c, _ in items]))


def test_vanishing_between_exists_and_get_is_a_miss(tmp_path: Path) -> None:
    a, b = FsTier(tmp_path), FsTier(tmp_path)
    (c, f), = frames(1)
    a.put(c.key, f)
    assert b.exists([c.key]) == [True]
    a.delete(c.key)
    assert b.get(c.key) is None
    a.discard(c.key)  # already gone: nothing to quarantine, no error


def test_truncated_file_is_quarantined(tmp_path: Path) -> None:
    t = FsTier(tmp_path)
    (c, f), = frames(1)
    t.put(c.key, f)
    os.truncate(chunk_path(tmp_path, c.key), len(f) // 2)
    assert t.get(c.key) is None and t.exists([c.key]) == [False]
    assert t.stats()["quarantined"] == 1 and len(list((tmp_path / QUARANTINE).iterdir())) == 1


def test_only_old_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / "ab").mkdir()
    old, young = tmp_path / "ab" / ".x.old.tmp", tmp_path / "ab" / ".x.young.tmp"
    old.write_bytes(b"crashed writer")
    young.write_bytes(b"live writer")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    t = FsTier(tmp_path, stale_temp_s=3600)
    assert not old.exists() and young.exists() and t.stats()["stale_temp_removed"] == 1


# ---- two real processes ------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, sys, time, numpy as np, torch
    from kvtier.frames import pack, unpack_into
    from kvtier.record import token_record
    from kvtier.errors import CorruptChunk
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.storage.fs import FsTier
    torch.set_num_threads(1)
    root, role, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = KVSpec(4, 4, 64, "float32", 64)  # 256 KiB frames: a torn read would be easy to see
    tier = FsTier(root, fsync=False)
    shared_arr, shared = Chunker(Namespace("shared", spec)).chunks(np.arange(8 * 64))
    own_arr, own = Chunker(Namespace("own-" + role, spec)).chunks(np.arange(8 * 64))
    fill = 1.0 if role == "a" else 2.0  # both write the same keys with different contents
    kv = torch.full(spec.chunk_shape(), fill)
    for c in own:
        tier.put(c.key, pack(token_record(c, own_arr), kv, spec))
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    stats = dict(puts=0, reads=0, misses=0, torn=0, seen_a=0, seen_b=0, deletes=0)
    out = torch.empty(spec.chunk_shape())
    deadline = time.monotonic() + 30
    i = 0
    while i < steps and time.monotonic() < deadline:
        c = shared[i % len(shared)]
        if i % 3 == 0:
            tier.put(c.key, pack(token_record(c, shared_arr), kv, spec)); stats["puts"] += 1
        elif i % 11 == 0 and role == "b":
            stats["deletes"] += tier.delete(c.key)
        else:
            present = tier.exists([c.key])[0]
            frame = tier.get(c.key)
            if frame is None:
                stats["misses"] += 1
            else:
                try:
                    unpack_into(frame, spec, out, expect=c.key)
                    value = out.flatten()[0].item()
                    stats["torn"] += not bool((out == value).all())
                    stats["seen_a" if value == 1.0 else "seen_b"] += 1
                except CorruptChunk:
                    stats["torn"] += 1
                stats["reads"] += 1
        i += 1
    other = "b" if role == "a" else "a"
    o_arr, o_chunks = Chunker(Namespace("own-" + other, spec)).chunks(np.arange(8 * 64))
    stats["other_found"] = 0
    for c in o_chunks:
        frame = tier.get(c.key)
        if frame is not None:
            unpack_into(frame, spec, out, expect=c.key)
            stats["other_found"] += bool((out == (1.0 if other == "a" else 2.0)).all())
    print(json.dumps(stats), flush=True)
    """
)


def test_two_processes_share_a_directory(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(Child([sys.executable, "-c", WORKER, str(tmp_path / "shared"), role, "400"],
                                             log=tmp_path / f"{role}.log", stdin=True))
                   for role in ("a", "b")]
        for w in workers:
            w.expect(r"^ready$", 60)
        for w in workers:
            w.send("go")  # start together
        results = [json.loads(w.expect(r"^\{", 90).string) for w in workers]
        assert [w.proc.wait(30) for w in workers] == [0, 0]
    for r in results:
        assert r["torn"] == 0
        assert r["other_found"] == 8  # each sees every chunk the other published
        assert r["reads"] > 0 and r["puts"] > 0
    # both writers' versions were observed by somebody, so reads really raced with the other's renames
    assert sum(r["seen_a"] for r in results) > 0 and sum(r["seen_b"] for r in results) > 0
    assert results[1]["deletes"] > 0
    assert not list((tmp_path / "shared").glob("*/.*.tmp"))


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_setting_round_trips(tmp_path: Path, fsync: bool) -> None:
    t = FsTier(tmp_path, fsync=fsync)
    (c, f), = frames(1)
    t.put(c.key, f)
    assert t.get(c.key) == f
