"""Arena slot allocation: lowest free slot first, so chunks stored together sit in consecutive slots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier import engine as engine_mod
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.layout import KVSpec
from kvtier.memory import Arena

SPEC = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32", chunk_tokens=16)


def test_freed_slots_come_back_lowest_first() -> None:
    arena = Arena(SPEC, 8 * SPEC.chunk_bytes)
    taken = [arena.allocate() for _ in range(8)]
    assert taken == list(range(8)) and arena.allocate() is None
    for slot in (5, 1, 7, 2, 0):
        arena.free(slot)
    assert [arena.allocate() for _ in range(5)] == [0, 1, 2, 5, 7]


def test_store_after_clear_lands_in_consecutive_slots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every store after a clear gets one run of slots (one copy_), whatever order clear freed them in,
    also when the store reserves them a few chunks at a time (here: one, as with write-back to disk)."""
    monkeypatch.setattr(engine_mod, "STORE_GROUP_BYTES", SPEC.chunk_bytes)
    tokens = 8 * SPEC.chunk_tokens
    cfg = load_config(environ={}, overrides={
        "chunk_tokens": SPEC.chunk_tokens, "cpu": {"capacity": 10 * SPEC.chunk_bytes},
        "disk": {"enabled": True, "path": str(tmp_path / "disk"), "fsync": False}})
    kv = torch.randn(SPEC.chunk_shape(tokens))
    ids = np.arange(tokens, dtype=np.uint32)
    out = torch.empty_like(kv)
    with CacheEngine(SPEC, "arena-test", cfg) as engine:
        for _ in range(3):
            engine.cpu.clear()
            assert engine.store(ids, kv) == tokens and engine.storage.flush(10)
            _arr, chunks = engine.chunker.chunks(ids)
            slots = [engine.cpu._index[c.key].slot for c in chunks]
            assert slots == list(range(slots[0], slots[0] + len(chunks)))
            assert engine.retrieve(ids, out) == tokens and torch.equal(out, kv)


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of this process's mapping that contains ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_arena_starts_zeroed_and_in_huge_pages_where_the_kernel_offers_them() -> None:
    """The arena is zero, faulted in and writable; with THP on (``madvise``/``always``) its large
    aligned part sits in 2 MiB pages, which a store's strided copy of a run of chunks walks faster."""
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16", chunk_tokens=256)
    arena = Arena(spec, 64 * spec.chunk_bytes)  # 16 MiB
    assert arena.buffer.shape == (64, *spec.chunk_shape()) and arena.buffer.dtype == torch.bfloat16
    assert not arena.buffer.any()
    arena.view(3).fill_(1.5)
    assert arena.buffer[3].eq(1.5).all() and not arena.buffer[4].any()
    if _thp_mode() not in ("always", "madvise") or not Path("/proc/self/smaps").exists():
        pytest.skip("this kernel offers no transparent huge pages")
    assert _anon_huge_kib(arena.buffer.data_ptr() + arena.capacity_bytes // 2) >= 2048
