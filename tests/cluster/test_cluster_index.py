"""The controller's index and key chain (in process, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.cluster.agent import _coalesce
from kvtier.cluster.index import ChunkIndex, chain_keys
from kvtier.keys import Chunker, Namespace
from kvtier.layout import KVSpec


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100])
@pytest.mark.parametrize("partial", [True, False])
def test_chain_keys_match_the_engine_chunker(n: int, partial: bool) -> None:
    spec = KVSpec(2, 2, 8, "float32", chunk_tokens=16)
    ns = Namespace(model="m", spec=spec, tenant="t")
    toks = np.random.RandomState(n).randint(0, 2**32 - 1, size=n, dtype=np.uint64).astype("<u4")
    _arr, chunks = Chunker(ns, partial=partial).chunks(toks)
    assert chain_keys(ns.root(), toks, 16, partial) == [(c.end, c.key) for c in chunks]


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_admit_evict_prefix_and_multiple_holders() -> None:
    idx = ChunkIndex()
    idx.admit("a", "cpu", [k(1), k(2), k(3)])
    idx.admit("b", "cpu", [k(1), k(2)])
    idx.admit("b", "disk", [k(2)])
    assert idx.prefix([k(1), k(2), k(3), k(4)], ["a", "b", "c"]) == {"a": 3, "b": 2}
    idx.evict("a", "cpu", [k(2)])  # a's evict must not hide b
    assert sorted(idx.holders(k(2))) == ["b"]
    assert idx.prefix([k(1), k(2), k(3)], ["a", "b"]) == {"a": 1, "b": 2}
    idx.evict("b", "cpu", [k(2)])  # still on b's disk
    assert idx.holders(k(2)) == ["b"]
    assert idx.counts("b") == {"cpu": 1, "disk": 1}
    assert idx.drop("b") == 2 and idx.holders(k(1)) == ["a"] and len(idx) == 2
    assert idx.total == 2


def test_events_are_idempotent_so_replay_after_snapshot_converges() -> None:
    idx = ChunkIndex()
    idx.replace("a", {"cpu": [k(1), k(2)]})
    for _ in range(2):  # replaying the log twice changes nothing
        idx.admit("a", "cpu", [k(2), k(3)])
        idx.evict("a", "cpu", [k(1)])
    assert sorted(idx.keys_of("a")) == [k(2), k(3)] and idx.total == 2


def test_index_is_bounded_and_marks_truncation() -> None:
    idx = ChunkIndex(max_keys_per_instance=3, max_keys_total=5)
    idx.admit("a", "cpu", [k(i) for i in range(10)])
    assert idx.counts("a") == {"cpu": 3} and "a" in idx.truncated
    idx.admit("b", "cpu", [k(i) for i in range(10, 20)])
    assert idx.total == 5 and idx.counters["admits_dropped"] == 7 + 8
    idx.drop("a")
    assert "a" not in idx.truncated and idx.total == 2


def test_coalesce_keeps_order() -> None:
    events = [("admit", k(1)), ("admit", k(2)), ("evict", k(1)), ("admit", k(1))]
    out = _coalesce(events)
    assert [(e["kind"], len(e["keys"])) for e in out] == [("admit", 2), ("evict", 1), ("admit", 1)]
