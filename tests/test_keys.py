"""Keys: stable across processes, namespaced, chained, verified on hit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import Chunker, Namespace, as_token_array
from kvtier.layout import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32", chunk_tokens=16)


def _keys(tokens, **ns) -> list[str]:
    _arr, chunks = Chunker(Namespace(model="m", spec=SPEC, **ns)).chunks(tokens)
    return [c.key.hex() for c in chunks]


def test_chunk_boundaries_and_partial_chunk() -> None:
    _arr, chunks = Chunker(Namespace("m", SPEC)).chunks(list(range(40)))
    assert [(c.start, c.end) for c in chunks] == [(0, 16), (16, 32), (32, 40)]
    assert [c.parent for c in chunks[1:]] == [c.key for c in chunks[:-1]]
    _arr, full_only = Chunker(Namespace("m", SPEC), partial=False).chunks(list(range(40)))
    assert [(c.start, c.end) for c in full_only] == [(0, 16), (16, 32)]


def test_key_depends_on_whole_prefix_and_namespace() -> None:
    base = _keys(list(range(48)))
    changed = list(range(48))
    changed[3] = 999
    assert _keys(changed)[0] != base[0]
    assert all(a != b for a, b in zip(_keys(changed), base))  # the chain propagates the change
    assert _keys(list(range(48)), tenant="t") != base
    assert _keys(list(range(48)), codec="cachegen") != base
    other = Chunker(Namespace("other-model", SPEC)).chunks(list(range(48)))[1]
    assert [c.key.hex() for c in other] != base
    bf16 = KVSpec(2, 2, 4, "bfloat16", 16)
    assert [c.key.hex() for c in Chunker(Namespace("m", bf16)).chunks(list(range(48)))[1]] != base


def test_partial_chunk_key_differs_from_full_chunk() -> None:
    short = _keys(list(range(20)))
    long = _keys(list(range(32)))
    assert short[0] == long[0] and short[1] != long[1]


def test_input_types_agree() -> None:
    tokens = list(range(100, 140))
    expected = _keys(tokens)
    assert _keys(np.array(tokens, dtype=np.int64)) == expected
    assert _keys(torch.tensor(tokens)) == expected
    assert _keys(torch.tensor([tokens])) == expected
    with pytest.raises(ValueError):
        as_token_array([-1, 2])


def test_keys_identical_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvtier.keys import Chunker, Namespace; from kvtier.layout import KVSpec;"
        "s=KVSpec(2,2,4,'float32',16);"
        "print(','.join(c.key.hex() for c in Chunker(Namespace('m', s, tenant='x')).chunks(list(range(70)))[1]))"
    )
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.strip())
    assert outs[0] == outs[1] == ",".join(_keys(list(range(70)), tenant="x"))


def test_forced_hash_collision_is_a_miss(monkeypatch) -> None:
    """With every key forced equal, different tokens must never be returned as a hit."""
    import kvtier.keys as keys_mod

    monkeypatch.setattr(keys_mod, "_xxh3_128", lambda data: b"\x00" * 16)
    engine = CacheEngine(SPEC, "m", load_config(overrides={"chunk_tokens": 16, "cpu": {"capacity": "1MiB"}}))
    kv = torch.randn(SPEC.num_layers, 2, 16, SPEC.num_kv_heads, SPEC.head_dim)
    assert engine.store(list(range(16)), kv) == 16
    other = list(range(1, 17))
    assert engine.chunker.chunks(other)[1][0].key == engine.chunker.chunks(list(range(16)))[1][0].key
    assert engine.lookup(other) == 0
    out = torch.zeros_like(kv)
    assert engine.retrieve(other, out) == 0
    assert torch.count_nonzero(out) == 0
    assert engine.stats()["cpu"]["collisions"] >= 2
    engine.close()


def test_chain_definition_is_xxh3_128_over_parent_and_tokens() -> None:
    """The documented chain, recomputed here with xxhash directly (catches a silent scheme change)."""
    import blake3
    import xxhash

    ns = Namespace("m", KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32", chunk_tokens=4))
    text = "\x1f".join(("kvtier/v2", "m", ns.spec.fingerprint(), "raw", ""))
    root = blake3.blake3(text.encode()).digest(length=16)
    assert ns.root() == root
    tokens = np.arange(10, dtype="<u4")
    _arr, chunks = Chunker(ns).chunks(tokens)
    parent = root
    for chunk in chunks:
        expected = xxhash.xxh3_128_digest(parent + tokens[chunk.start : chunk.end].tobytes())
        assert chunk.parent == parent and chunk.key == expected
        parent = expected
    assert [c.end for c in chunks] == [4, 8, 10]


def test_record_verification_needs_every_field() -> None:
    from kvtier.record import ChunkRecord, Kind, token_record, token_records, verify

    arr, chunks = Chunker(Namespace("m", SPEC)).chunks(list(range(40)))
    record = token_record(chunks[1], arr)
    assert record == ChunkRecord(chunks[1].key, chunks[0].key, arr[16:32].tobytes(), Kind.TOKENS, 16)
    assert token_records(chunks, arr) == [token_record(c, arr) for c in chunks]
    assert verify(record, record)
    for field, other in (("key", b"\1" * 16), ("parent", b"\2" * 16), ("identity", arr[17:33].tobytes()),
                         ("kind", Kind.PAGE), ("num_tokens", 15)):
        assert not verify(record._replace(**{field: other}), record), field


def test_kvspec_sizes_match_torch() -> None:
    from kvtier.layout import DTYPE_SIZES

    for name in DTYPE_SIZES:
        spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=name, chunk_tokens=16)
        assert spec.itemsize == torch.empty((), dtype=spec.torch_dtype).element_size()
        assert spec.chunk_bytes == torch.empty(spec.chunk_shape(), dtype=spec.torch_dtype).nbytes


def test_cpu_leading_hits_is_verify_of_each_chunk() -> None:
    """The lookup's whole-bytes compare (parent || ids per chunk) accepts exactly what ``verify``
    accepts: a chunk whose stored record differs in any field (or splits parent/ids differently into
    the same bytes) ends the hit there and counts a collision."""
    from kvtier.record import Kind, token_records, verify
    from kvtier.storage.cpu import CpuTier

    chunker = Chunker(Namespace("m", SPEC))
    tokens = list(range(100, 170))  # 4 full chunks and a partial one
    arr, keys, hashed = chunker.hashed(tokens)
    real = token_records(chunker.chunks_of(arr, keys), arr)
    r2 = real[2]
    forged = {
        "parent": r2._replace(parent=b"\7" * 16),
        "identity": r2._replace(identity=r2.identity[:-4] + b"\0\0\0\0"),
        "num_tokens": r2._replace(num_tokens=15),
        "kind": r2._replace(kind=Kind.PAGE),
        "split": r2._replace(parent=r2.parent + r2.identity[:4], identity=r2.identity[4:], num_tokens=15),
    }
    for name, record in [("same", r2), *forged.items()]:
        tier = CpuTier(SPEC, 8 * SPEC.chunk_bytes)
        tier.admit([*real[:2], record, *real[3:]], len)
        expected = 5 if name == "same" else 2
        assert tier.leading_hits(keys, hashed) == expected, name
        assert tier.counters["collisions"] == (0 if name == "same" else 1), name
        assert [tier.contains(r) for r in real] == [verify(s, r) for s, r in zip([*real[:2], record, *real[3:]], real)]
    tier = CpuTier(SPEC, 8 * SPEC.chunk_bytes)
    tier.admit(real[:3], len)
    assert tier.leading_hits(keys, hashed) == 3 and tier.leading_hits(keys[:2], hashed[:2]) == 2
    assert tier.leading_hits([], []) == 0 and tier.counters["collisions"] == 0
    assert tier.remove(real[0].key) and tier.leading_hits(keys, hashed) == 0
