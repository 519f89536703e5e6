"""The SGLang adapter's pure parts, without SGLang: key mapping, page layout, integrity, failure.

SGLang is not installed here, so :class:`KvtierStorage` is a plain class; two things are faked, both
with SGLang 0.5.23's field names: the ``HiCacheStorageConfig`` (a namespace of its fields) and the MHA
host pool (``kv_buffer`` plus geometry attributes, shaped as SGLang shapes it for each layout). Page
hashes are real SHA-256 chains built the way SGLang builds them. The real-server tests are in
``test_sglang.py``.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvtier.errors import ConfigError, LayoutError
from kvtier.integrations.sglang.backend import KvtierStorage
from kvtier.integrations.sglang.pages import PageKeys, PoolView, copy_page, namespace_model
from kvtier.integrations.sglang.stats import IoStats
from kvtier.keys import Namespace
from kvtier.layout import KVSpec
from kvtier.record import Kind

PAGE, LAYERS, HEADS, DIM = 16, 3, 2, 8


def page_hashes(tokens: list[int], page: int = PAGE) -> list[str]:
    """SGLang's chain: sha256(previous digest || page tokens as u32 little endian)."""
    out, prev = [], b""
    for start in range(0, len(tokens), page):
        chunk = tokens[start : start + page]
        prev = hashlib.sha256(prev + struct.pack(f"<{len(chunk)}I", *chunk)).digest()
        out.append(prev.hex())
    return out


def fake_pool(layout: str = "layer_first", slots: int = 8 * PAGE, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    shape = (2, LAYERS, slots, HEADS, DIM) if layout == "layer_first" else (2, slots, LAYERS, HEADS, DIM)
    buffer = torch.randn(shape, generator=g).to(torch.bfloat16)
    return SimpleNamespace(layout=layout, kv_buffer=buffer, page_size=PAGE, layer_num=LAYERS, head_num=HEADS,
                           head_dim=DIM, dtype=torch.bfloat16)


def storage_config(tmp_path: Path, **extra: Any) -> SimpleNamespace:
    extra.setdefault("kvtier", {"disk": {"enabled": True, "path": str(tmp_path / "disk"), "fsync": False}})
    return SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=False,
                           model_name="m", extra_config={"backend_name": "kvtier", "interface_v1": 1, **extra})


def backend(tmp_path: Path, pool: SimpleNamespace | None = None, **extra: Any) -> KvtierStorage:
    storage = KvtierStorage(storage_config(tmp_path, **extra))
    storage.register_mem_pool_host(pool if pool is not None else fake_pool())
    return storage


def slots(pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


# ---- keys ---------------------------------------------------------------------------------------
SPEC = KVSpec(LAYERS, HEADS, DIM, "bfloat16", PAGE)
HASHES = page_hashes(list(range(100)))


def test_keys_are_stable_and_namespaced() -> None:
    keys = PageKeys(Namespace("sglang-page/m", SPEC))
    assert keys.key(HASHES[0]) == PageKeys(Namespace("sglang-page/m", SPEC)).key(HASHES[0])
    assert len(keys.key(HASHES[0])) == 16
    others = [
        PageKeys(Namespace("sglang-page/other", SPEC)),
        PageKeys(Namespace("sglang-page/m", KVSpec(LAYERS, HEADS, DIM, "float16", PAGE))),
        PageKeys(Namespace("sglang-page/m", KVSpec(LAYERS, HEADS, DIM, "bfloat16", 32))),
        PageKeys(Namespace("sglang-page/m", SPEC, tenant="t")),
    ]
    assert all(o.key(HASHES[0]) != keys.key(HASHES[0]) for o in others)
    assert len({keys.key(h) for h in HASHES}) == len(HASHES)


def test_ranks_are_part_of_the_model_name() -> None:
    assert namespace_model("m") == "sglang-page/m"
    assert namespace_model("m", 0, 2) != namespace_model("m", 1, 2)
    assert namespace_model("m", pp_rank=1, pp_size=2) != namespace_model("m", pp_rank=0, pp_size=2)


def test_a_page_record_holds_the_page_hash_not_token_ids() -> None:
    keys = PageKeys(Namespace("sglang-page/m", SPEC))
    record = keys.record(HASHES[3])
    assert record.kind == Kind.PAGE and record.identity == bytes.fromhex(HASHES[3])
    assert record.num_tokens == PAGE and record.parent == keys.root and record.key == keys.key(HASHES[3])
    assert keys.identity("not-hex-key") == b"not-hex-key"
    assert len(keys.identity("x" * 5000)) == 32  # an overlong key is verified by its digest
    assert keys.identity("x" * 5000) != keys.identity("x" * 5001)


# ---- pool layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_pool_view_gives_canonical_pages(layout: str) -> None:
    pool = fake_pool(layout)
    view = PoolView(pool)
    page = view.page(2 * PAGE)
    assert page.shape == SPEC.chunk_shape()
    for layer in range(LAYERS):
        for kv in range(2):
            for t in range(PAGE):
                slot = 2 * PAGE + t
                want = pool.kv_buffer[kv, layer, slot] if layout == "layer_first" else pool.kv_buffer[kv, slot, layer]
                assert torch.equal(page[layer, kv, t], want)
    # the legacy path's flat page is the host page flattened in the pool's own order
    host_page = pool.kv_buffer[:, :, 2 * PAGE : 3 * PAGE] if layout == "layer_first" else \
        pool.kv_buffer[:, 2 * PAGE : 3 * PAGE]
    assert torch.equal(view.from_flat(host_page.flatten()), page)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_copy_page_is_byte_exact_between_strided_views(dtype: torch.dtype) -> None:
    src = torch.randn(2, LAYERS, 4 * PAGE, HEADS, DIM).to(dtype)
    dst = torch.zeros(LAYERS, 2, PAGE, HEADS, DIM).to(dtype)
    view = src[:, :, PAGE : 2 * PAGE].permute(1, 0, 2, 3, 4)
    copy_page(dst, view)
    assert torch.equal(dst.view(torch.uint8), view.contiguous().view(torch.uint8))
    with pytest.raises(LayoutError):
        copy_page(dst, view.to(torch.float16))


def test_pool_view_rejects_what_it_cannot_map() -> None:
    with pytest.raises(LayoutError, match="page_head"):
        PoolView(SimpleNamespace(**{**vars(fake_pool()), "layout": "page_head"}))
    with pytest.raises(LayoutError, match="MHA"):
        PoolView(SimpleNamespace(**{**vars(fake_pool()), "v_head_dim": DIM // 2}))
    with pytest.raises(LayoutError, match="page start"):
        PoolView(fake_pool()).page(3)


# ---- the backend --------------------------------------------------------------------------------
def test_store_then_load_into_another_pool(tmp_path: Path) -> None:
    src = fake_pool(seed=1)
    writer = backend(tmp_path, src)
    assert writer.batch_set_v1(HASHES[:4], slots([5, 1, 2, 7])) == [True] * 4
    writer.close()
    dst = fake_pool(seed=2)
    reader = backend(tmp_path, dst)  # a new process would compute the same keys
    assert reader.batch_exists(HASHES[:6]) == 4
    assert reader.batch_get_v1(HASHES[:4], slots([0, 3, 4, 6])) == [True] * 4
    for d, s in zip([0, 3, 4, 6], [5, 1, 2, 7]):
        assert torch.equal(PoolView(dst).page(d * PAGE), PoolView(src).page(s * PAGE))
    assert reader.counters["read_pages"] == 4


def test_get_stats_reports_pages_and_bandwidth_in_sglangs_shape(tmp_path: Path) -> None:
    """get_stats() drains one record per read / write: pages moved and GB/s (SGLang's StorageMetrics)."""
    storage = backend(tmp_path)
    empty = storage.get_stats()
    assert (empty.prefetch_pgs, empty.backup_pgs, empty.prefetch_bandwidth, empty.backup_bandwidth) == ([], [], [], [])
    assert storage.batch_set_v1(HASHES[:3], slots([0, 1, 2])) == [True] * 3
    assert storage.batch_get_v1(HASHES[:5], slots([3, 4, 5, 6, 7])) == [True] * 3 + [False] * 2
    assert storage.batch_get_v1(HASHES[5:6], slots([3])) == [False]  # moved nothing: not recorded
    stats = storage.get_stats()
    assert stats.backup_pgs == [3] and stats.prefetch_pgs == [3]
    assert len(stats.backup_bandwidth) == 1 and stats.backup_bandwidth[0] > 0
    assert len(stats.prefetch_bandwidth) == 1 and stats.prefetch_bandwidth[0] > 0
    assert storage.get_stats().prefetch_pgs == []  # drained


def test_io_stats_hold_at_most_max_records() -> None:
    io = IoStats(max_records=2)
    for pages in (1, 2, 3):
        io.record("backup", pages, pages * 100, 0.001)
    assert io.drain().backup_pgs == [2, 3]


def test_exists_has_prefix_semantics(tmp_path: Path) -> None:
    storage = backend(tmp_path)
    storage.batch_set_v1([HASHES[0], HASHES[2]], slots([0, 1]))
    assert storage.batch_exists(HASHES[:3]) == 1
    assert storage.exists(HASHES[2]) and not storage.exists(HASHES[1])
    assert storage.batch_get_v1(HASHES[:3], slots([2, 3, 4])) == [True, False, False]


def test_a_flipped_byte_is_a_counted_miss(tmp_path: Path) -> None:
    storage = backend(tmp_path)
    storage.batch_set_v1(HASHES[:3], slots([0, 1, 2]))
    assert storage.keys is not None
    key = storage.keys.key(HASHES[1]).hex()
    path = tmp_path / "disk" / key[:2] / f"{key}.kvt"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    before = PoolView(storage.mem_pool_host).page(5 * PAGE).clone()
    assert storage.batch_get_v1(HASHES[:3], slots([4, 5, 6])) == [True, False, False]
    assert torch.equal(PoolView(storage.mem_pool_host).page(5 * PAGE), before)  # never half-written
    assert storage.stats()["disk"]["corrupt"] == 1
    assert storage.batch_exists(HASHES[:3]) == 1  # discarded from the tier


def test_a_frame_under_a_foreign_identity_is_a_miss(tmp_path: Path) -> None:
    """Same kvtier key, different page hash in the frame (what a key collision would look like)."""
    storage = backend(tmp_path)
    storage.batch_set_v1([HASHES[0]], slots([0]))
    assert storage.keys is not None
    real_identity = storage.keys.identity
    storage.keys.__dict__["identity"] = lambda h: real_identity(HASHES[1])  # reader expects another hash
    try:
        assert storage.batch_get_v1([HASHES[0]], slots([1])) == [False]
    finally:
        del storage.keys.__dict__["identity"]
    assert storage.stats()["disk"]["collisions"] == 1


def test_legacy_copying_path_round_trips(tmp_path: Path) -> None:
    pool = fake_pool()
    storage = backend(tmp_path, pool)
    flat = pool.kv_buffer[:, :, PAGE : 2 * PAGE].flatten().clone()
    assert storage.batch_set([HASHES[0]], [flat])
    got = storage.get(HASHES[0])
    assert got is not None and torch.equal(got, flat)
    assert storage.batch_get([HASHES[0], HASHES[1]]) [1] is None


def test_any_error_is_a_counted_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = backend(tmp_path)
    assert storage.manager is not None

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("tier bug")

    monkeypatch.setattr(storage.manager, "locate", broken)
    monkeypatch.setattr(storage.manager, "write_back", broken)
    assert storage.batch_exists(HASHES[:2]) == 0
    assert storage.batch_get_v1(HASHES[:2], slots([0, 1])) == [False, False]
    assert storage.batch_set_v1(HASHES[:2], slots([0, 1])) == [False, False]
    assert storage.batch_get_v1(HASHES[:2], torch.arange(3)) == [False, False]  # too few host slots
    assert storage.counters["batch_exists_errors"] == 1
    assert storage.counters["batch_get_v1_errors"] == 2


def test_unusable_pool_or_mla_leaves_l3_empty(tmp_path: Path) -> None:
    storage = backend(tmp_path, SimpleNamespace(**{**vars(fake_pool()), "layout": "page_head"}))
    assert storage.manager is None and storage.batch_exists(HASHES[:1]) == 0
    mla = KvtierStorage(SimpleNamespace(**{**vars(storage_config(tmp_path)), "is_mla_model": True}))
    mla.register_mem_pool_host(fake_pool())
    assert mla.manager is None and mla.batch_set_v1(HASHES[:1], slots([0])) == [False]


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kvtier_confg"):
        KvtierStorage(storage_config(tmp_path, kvtier_confg="x.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        KvtierStorage(storage_config(tmp_path, kvtier="disk"))
    with pytest.raises(ConfigError, match="serialized tier"):
        KvtierStorage(storage_config(tmp_path, kvtier={"cpu": {"capacity": "1GiB"}}))
    with pytest.raises(ConfigError):
        KvtierStorage(storage_config(tmp_path, kvtier={"disk": {"enabld": True}}))
