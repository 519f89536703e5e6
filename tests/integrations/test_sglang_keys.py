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
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvtier.errors import ConfigError, LayoutError, TierUnavailable
from kvtier.integrations.sglang.backend import KvtierStorage
from kvtier.integrations.sglang.pages import (
    LAYOUTS,
    MAX_PAGES_PER_OBJECT,
    HostPages,
    PageIndex,
    PageKeys,
    PoolView,
    Span,
    auto_pages_per_object,
    copy_exact,
    matching_pages,
    namespace_model,
    object_pages,
    object_slabs,
    pages_of,
    spans,
)
from kvtier.integrations.sglang.stats import IoStats
from kvtier.keys import Namespace
from kvtier.layout import KVSpec
from kvtier.record import Kind
from kvtier.tensors import int_view

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
    shape = {"layer_first": (2, LAYERS, slots, HEADS, DIM), "page_first": (2, slots, LAYERS, HEADS, DIM),
             "page_first_direct": (2, slots // PAGE, LAYERS, PAGE, HEADS, DIM)}[layout]
    buffer = torch.randn(shape, generator=g).to(torch.bfloat16)
    return SimpleNamespace(layout=layout, kv_buffer=buffer, page_size=PAGE, layer_num=LAYERS, head_num=HEADS,
                           head_dim=DIM, dtype=torch.bfloat16)


def storage_config(tmp_path: Path, **extra: Any) -> SimpleNamespace:
    extra.setdefault("kvtier", {"disk": {"enabled": True, "path": str(tmp_path / "disk"), "fsync": False}})
    return SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=False,
                           model_name="m", extra_config={"backend_name": "kvtier", "interface_v1": 1, **extra})


def backend(tmp_path: Path, pool: SimpleNamespace | None = None, **extra: Any) -> KvtierStorage:
    """A backend on a fake pool; one page per object unless ``kvtier_pages_per_object`` says otherwise."""
    extra.setdefault("kvtier_pages_per_object", 1)
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
    assert keys.key(HASHES[0], 1) == PageKeys(Namespace("sglang-page/m", SPEC)).key(HASHES[0], 1)
    assert len(keys.key(HASHES[0], 1)) == 16
    others = [
        PageKeys(Namespace("sglang-page/other", SPEC)),
        PageKeys(Namespace("sglang-page/m", KVSpec(LAYERS, HEADS, DIM, "float16", PAGE))),
        PageKeys(Namespace("sglang-page/m", KVSpec(LAYERS, HEADS, DIM, "bfloat16", 32))),
        PageKeys(Namespace("sglang-page/m", SPEC, tenant="t")),
    ]
    assert all(o.key(HASHES[0], 1) != keys.key(HASHES[0], 1) for o in others)
    assert len({keys.key(h, 1) for h in HASHES}) == len(HASHES)
    assert keys.key(HASHES[3], 4) != keys.key(HASHES[3], 2)  # the page count is part of the key


def test_ranks_are_part_of_the_model_name() -> None:
    assert namespace_model("m") == "sglang-page/m"
    assert namespace_model("m", 0, 2) != namespace_model("m", 1, 2)
    assert namespace_model("m", pp_rank=1, pp_size=2) != namespace_model("m", pp_rank=0, pp_size=2)


def test_an_object_record_holds_every_page_hash_not_token_ids() -> None:
    keys = PageKeys(Namespace("sglang-page/m", SPEC))
    record = keys.record(HASHES[4:7])
    assert record.kind == Kind.PAGE and record.identity == b"".join(bytes.fromhex(h) for h in HASHES[4:7])
    assert record.num_tokens == 3 * PAGE and record.parent == keys.root and record.key == keys.key(HASHES[6], 3)
    assert pages_of(record) == 3
    assert len(keys.page_id("not-hex-key")) == 32 and len(keys.page_id("x" * 5000)) == 32  # digests
    assert keys.page_id("x" * 5000) != keys.page_id("x" * 5001)
    ids = [keys.page_id(h) for h in HASHES[4:6]] + [keys.page_id("other")]
    assert matching_pages(record, ids) == 2 and matching_pages(record, ids, 1) == 1
    with pytest.raises(LayoutError):
        keys.record([HASHES[0]] * 129)


def test_spans_sit_at_fixed_positions() -> None:
    assert spans(0, 10, 4) == [Span(0, 0, 4), Span(4, 4, 8), Span(8, 8, 10)]
    assert spans(6, 5, 4) == [Span(4, 6, 8), Span(8, 8, 11)]  # a call starting inside a group
    assert spans(3, 2, 1) == [Span(3, 3, 4), Span(4, 4, 5)]
    assert spans(5, 0, 4) == []


def test_auto_pages_per_object_is_a_power_of_two_within_16_mib() -> None:
    assert auto_pages_per_object(360 << 10) == 32  # SmolLM2-135M, 16-token bf16 pages: 11.25 MiB
    assert auto_pages_per_object(1440 << 10) == 8
    assert auto_pages_per_object(8 << 20) == 2
    assert auto_pages_per_object(9 << 20) == 1
    assert auto_pages_per_object(32 << 20) == 1  # a page larger than the cap still is an object
    assert auto_pages_per_object(1) == MAX_PAGES_PER_OBJECT


def test_page_index_is_bounded() -> None:
    keys = PageKeys(Namespace("sglang-page/m", SPEC))
    index = PageIndex(max_pages=5)
    index.add(keys.record(A[0:4]))
    index.add(keys.record(A[4:8]))
    assert len(index) == 5 and index.find(keys.page_id(A[0])) is None
    found = index.find(keys.page_id(A[6]))
    assert found is not None and found[1] == 2 and pages_of(found[0]) == 4


# ---- pool layout --------------------------------------------------------------------------------
def host_token(pool: SimpleNamespace, kv: int, layer: int, slot: int) -> torch.Tensor:
    """Token ``slot``'s heads of one layer's K or V, read from the pool by SGLang's own layout rules."""
    buffer = pool.kv_buffer
    if pool.layout == "layer_first":
        return buffer[kv, layer, slot]
    if pool.layout == "page_first":
        return buffer[kv, slot, layer]
    return buffer[kv, slot // PAGE, layer, slot % PAGE]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_view_gives_canonical_pages(layout: str) -> None:
    pool = fake_pool(layout)
    view = PoolView(pool)
    page = view.page(2 * PAGE)
    assert page.shape == SPEC.chunk_shape()
    for layer in range(LAYERS):
        for kv in range(2):
            for t in range(PAGE):
                assert torch.equal(page[layer, kv, t], host_token(pool, kv, layer, 2 * PAGE + t))
    # the legacy path's flat page is the host page flattened in the pool's own order (SGLang's get_data_page)
    host_page = {"layer_first": pool.kv_buffer[:, :, 2 * PAGE : 3 * PAGE],
                 "page_first": pool.kv_buffer[:, 2 * PAGE : 3 * PAGE],
                 "page_first_direct": pool.kv_buffer[:, 2:3]}[layout]
    assert torch.equal(view.from_flat(host_page.flatten()), page)
    run = view.pages(2 * PAGE, 3)  # three consecutive pages as one view
    assert run.shape == (LAYERS, 2, 3, PAGE, HEADS, DIM)
    for i in range(3):
        assert torch.equal(run[:, :, i], view.page((2 + i) * PAGE))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_pages_copy_runs_of_consecutive_pages_byte_exact(layout: str) -> None:
    pool = fake_pool(layout, seed=3)
    view = PoolView(pool)
    starts = [p * PAGE for p in (3, 4, 5, 0, 7, 1, 2)]
    pages = HostPages(view, starts)
    assert [(offset, run.shape[2]) for offset, run in pages.runs(0, 7)] == [(0, 3), (3, 1), (4, 1), (5, 2)]
    assert [(offset, run.shape[2]) for offset, run in pages.runs(1, 5)] == [(0, 2), (2, 1), (3, 1), (4, 1)]
    obj = torch.zeros(SPEC.chunk_shape(9 * PAGE), dtype=torch.bfloat16)  # an object of 9 pages
    pages.gather(object_pages(obj, PAGE), 1, 0, 7)  # call pages 0-6 -> object pages 1-7
    for i, start in enumerate(starts):
        assert torch.equal(obj[:, :, (i + 1) * PAGE : (i + 2) * PAGE], view.page(start))
    assert not obj[:, :, :PAGE].any() and not obj[:, :, 8 * PAGE :].any()  # nothing outside the range
    other = fake_pool(layout, seed=4)
    before = [PoolView(other).page(p * PAGE).clone() for p in range(8)]
    HostPages(PoolView(other), starts).scatter(object_pages(obj, PAGE), 2, 1, 5)  # object 2-6 -> call 1-5
    for i, start in enumerate(starts):
        want = obj[:, :, (i + 1) * PAGE : (i + 2) * PAGE] if 1 <= i <= 5 else before[start // PAGE]
        assert torch.equal(PoolView(other).page(start), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_copy_exact_is_byte_exact_between_strided_views(dtype: torch.dtype) -> None:
    src = torch.randn(2, LAYERS, 4 * PAGE, HEADS, DIM).to(dtype)
    dst = torch.zeros(LAYERS, 2, PAGE, HEADS, DIM).to(dtype)
    view = src[:, :, PAGE : 2 * PAGE].permute(1, 0, 2, 3, 4)
    copy_exact(int_view(dst).numpy(), int_view(view).numpy())
    assert torch.equal(dst.view(torch.uint8), view.contiguous().view(torch.uint8))
    with pytest.raises(LayoutError):  # another element size, or another shape: never a converting copy
        copy_exact(int_view(dst).numpy(), int_view(view.to(torch.float64)).numpy())
    with pytest.raises(LayoutError):
        copy_exact(int_view(dst).numpy(), int_view(view[:, :, 1:]).numpy())


def test_pool_view_rejects_what_it_cannot_map() -> None:
    with pytest.raises(LayoutError, match="does not match"):
        PoolView(SimpleNamespace(**{**vars(fake_pool()), "layout": "page_first_direct"}))
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
    key = storage.keys.key(HASHES[1], 1).hex()
    path = tmp_path / "disk" / key[:2] / f"{key}.kvt"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert storage.batch_get_v1(HASHES[:3], slots([4, 5, 6])) == [True, False, False]
    assert torch.equal(PoolView(storage.mem_pool_host).page(4 * PAGE), PoolView(storage.mem_pool_host).page(0))
    # page 5 may hold the damaged bytes (read straight into the pool): SGLang frees it unread (backend._read_into)
    assert storage.stats()["disk"]["corrupt"] == 1
    assert storage.batch_exists(HASHES[:3]) == 1  # discarded from the tier


def test_a_frame_under_a_foreign_identity_is_a_miss(tmp_path: Path) -> None:
    """Same kvtier key, different page hash in the frame (what a key collision would look like)."""
    storage = backend(tmp_path)
    storage.batch_set_v1([HASHES[0]], slots([0]))
    assert storage.keys is not None
    real = storage.keys.record
    storage.keys.__dict__["record"] = lambda hashes: real(hashes)._replace(identity=real([HASHES[1]]).identity)
    try:  # the reader expects another page hash under the same key
        assert storage.batch_get_v1([HASHES[0]], slots([1])) == [False]
    finally:
        del storage.keys.__dict__["record"]
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
    monkeypatch.setattr(storage.manager, "put_frame", broken)
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


# ---- several pages per object ---------------------------------------------------------------------
A = page_hashes(list(range(10 * PAGE)))  # ten pages
B = page_hashes(list(range(6 * PAGE)) + list(range(1000, 1000 + 4 * PAGE)))  # shares A's first six pages


def after(prefix: list[str]) -> SimpleNamespace:
    """SGLang's extra_info with the page hashes before the call's keys."""
    return SimpleNamespace(prefix_keys=list(prefix), extra_info=None)


def grouped(tmp_path: Path, pool: SimpleNamespace | None = None) -> KvtierStorage:
    return backend(tmp_path, pool if pool is not None else fake_pool(slots=16 * PAGE), kvtier_pages_per_object=4)


def stored_objects(tmp_path: Path) -> int:
    return len(list((tmp_path / "disk").rglob("*.kvt")))


def same_pages(a: SimpleNamespace, a_pages: list[int], b: SimpleNamespace, b_pages: list[int]) -> bool:
    return all(torch.equal(PoolView(a).page(x * PAGE), PoolView(b).page(y * PAGE)) for x, y in zip(a_pages, b_pages))


def test_groups_of_pages_are_one_object_each_and_the_tail_is_kept(tmp_path: Path) -> None:
    src = fake_pool(slots=16 * PAGE, seed=1)
    writer = grouped(tmp_path, src)
    assert writer.batch_set_v1(A, slots(list(range(10))), after([])) == [True] * 10
    assert stored_objects(tmp_path) == 3  # pages 0-3, 4-7 and the tail 8-9
    writer.close()
    dst = fake_pool(slots=16 * PAGE, seed=2)
    reader = grouped(tmp_path, dst)  # a new process: no page index, keys from the hashes alone
    assert reader.batch_exists(A, after([])) == 10
    assert reader.batch_get_v1(A, slots(list(range(15, 5, -1))), after([])) == [True] * 10
    assert same_pages(src, list(range(10)), dst, list(range(15, 5, -1)))
    # a call that starts inside an object (the host already holds pages 0-4) still hits
    assert reader.batch_exists(A[5:], after(A[:5])) == 5
    assert reader.batch_get_v1(A[5:], slots([0, 1, 2, 3, 4]), after(A[:5])) == [True] * 5
    assert same_pages(src, [5, 6, 7, 8, 9], dst, [0, 1, 2, 3, 4])
    # a shorter prompt ending inside the last group: the tail object holds its pages
    assert reader.batch_exists(A[:9], after([])) == 9


def test_a_call_starting_inside_a_group_completes_the_group(tmp_path: Path) -> None:
    """SGLang writes one radix node per call; a node that starts mid-group gets the group's head from
    the tiers and the whole group is stored, so a reader finds it by its own hashes."""
    src = fake_pool(slots=16 * PAGE, seed=1)
    writer = grouped(tmp_path, src)
    assert writer.batch_set_v1(A[:6], slots(list(range(6))), after([])) == [True] * 6
    assert writer.batch_set_v1(A[6:], slots(list(range(6, 10))), after(A[:6])) == [True] * 4
    writer.close()
    dst = fake_pool(slots=16 * PAGE, seed=2)
    reader = grouped(tmp_path, dst)
    assert reader.batch_get_v1(A, slots(list(range(10))), after([])) == [True] * 10
    assert same_pages(src, list(range(10)), dst, list(range(10)))


def test_a_prompt_sharing_part_of_a_group_hits_the_shared_pages(tmp_path: Path) -> None:
    src = fake_pool(slots=16 * PAGE, seed=1)
    storage = grouped(tmp_path, src)
    assert storage.batch_set_v1(A[:8], slots(list(range(8))), after([])) == [True] * 8
    # B = A's pages 0-5, then its own: found through the page index, verified page by page
    assert storage.batch_exists(B[:8], after([])) == 6
    got = storage.batch_get_v1(B[:8], slots(list(range(8, 16))), after([]))
    assert got == [True] * 6 + [False] * 2
    assert same_pages(src, list(range(6)), src, list(range(8, 14)))
    assert storage.counters["index_hits"] >= 1
    # B's own pages 6-7 (a radix node starting mid-group): the group's head comes from A's object
    assert storage.batch_set_v1(B[6:8], slots([14, 15]), after(B[:6])) == [True, True]
    storage.close()
    fresh = grouped(tmp_path, fake_pool(slots=16 * PAGE, seed=3))  # A and B both whole, by their own keys
    assert fresh.batch_exists(A[:8], after([])) == 8 and fresh.batch_exists(B[:8], after([])) == 8
    assert fresh.batch_exists(B[:10], after([])) == 8


def test_shorter_objects_of_a_group_are_probed_in_one_call_per_tier(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A group whose longest object is missing is probed for every shorter one at once, longest first
    (one ``exists`` per tier, not one per length: a round trip each on a remote tier)."""
    storage = grouped(tmp_path)
    assert storage.batch_set_v1(A[:6], slots(list(range(6))), after([])) == [True] * 6  # 0-3 and the tail 4-5
    assert storage.manager is not None and storage.keys is not None
    tier = storage.manager.slots[0].tier
    calls: list[int] = []
    exists = tier.exists
    monkeypatch.setattr(tier, "exists", lambda keys: calls.append(len(keys)) or exists(keys))
    assert storage.batch_exists(A[:8], after([])) == 6
    assert calls == [2, 3]  # the two groups' longest objects, then pages 4-6, 4-5 and 4 of group 1
    present, absent = storage.keys.record(A[:4]).key, storage.keys.record(A[:3]).key
    assert storage.manager.where([present, absent, present]) == [0, None, 0]
    assert storage.manager.locate([present, absent, present]) == [0]


def test_a_damaged_page_in_an_object_is_a_counted_miss(tmp_path: Path) -> None:
    storage = grouped(tmp_path)
    storage.batch_set_v1(A[:8], slots(list(range(8))), after([]))
    assert storage.keys is not None
    key = storage.keys.record(A[4:8]).key.hex()
    path = tmp_path / "disk" / key[:2] / f"{key}.kvt"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert storage.batch_get_v1(A[:8], slots(list(range(8, 16))), after([])) == [True] * 4 + [False] * 4
    pool = storage.mem_pool_host
    assert same_pages(pool, [0, 1, 2, 3], pool, [8, 9, 10, 11])  # pages 12..15 are reported missing
    assert storage.stats()["disk"]["corrupt"] == 1


def test_no_prefix_keys_means_the_sequence_start(tmp_path: Path) -> None:
    """SGLang passes ``prefix_keys=None`` (not ``[]``) for a call at the start of a sequence."""
    storage = grouped(tmp_path)
    none = SimpleNamespace(prefix_keys=None, extra_info=None)
    assert storage.batch_set_v1(A[:5], slots(list(range(5))), none) == [True] * 5
    assert stored_objects(tmp_path) == 2  # pages 0-3 and the tail 4
    assert storage.batch_exists(A[:5], after([])) == 5
    assert storage.batch_get_v1(A[:5], slots(list(range(5, 10)))) == [True] * 5


def test_pages_per_object_is_checked(tmp_path: Path) -> None:
    for bad in (0, 129, "8", True):
        with pytest.raises(ConfigError, match="kvtier_pages_per_object"):
            KvtierStorage(storage_config(tmp_path, kvtier_pages_per_object=bad))
    auto = backend(tmp_path, kvtier_pages_per_object="auto")
    assert auto.pages_per_object == MAX_PAGES_PER_OBJECT  # this pool's pages are 1.5 KiB


def test_pages_move_between_layouts(tmp_path: Path) -> None:
    """Objects are canonical whatever the host layout: pages written from one layout read into another."""
    src = fake_pool("page_first_direct", slots=16 * PAGE, seed=1)
    writer = grouped(tmp_path, src)
    assert writer.batch_set_v1(A[:10], slots([9, 10, 11, 12, 0, 1, 2, 3, 4, 5]), after([])) == [True] * 10
    writer.close()
    for layout in ("layer_first", "page_first"):
        dst = fake_pool(layout, slots=16 * PAGE, seed=2)
        reader = grouped(tmp_path, dst)
        assert reader.batch_get_v1(A[:10], slots([4, 5, 6, 7, 15, 14, 0, 1, 2, 3]), after([])) == [True] * 10
        assert same_pages(src, [9, 10, 11, 12, 0, 1, 2, 3, 4, 5], dst, [4, 5, 6, 7, 15, 14, 0, 1, 2, 3])
        reader.close()


# ---- objects written straight from the pool ------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_object_slabs_are_the_objects_bytes_in_place_or_none(layout: str) -> None:
    pool = fake_pool(layout, slots=8 * PAGE)
    host = HostPages(PoolView(pool), [p * PAGE for p in (5, 6, 0, 1, 2)])  # runs of 2 and 3 pages
    canonical = torch.empty((LAYERS, 2, 5 * PAGE, HEADS, DIM), dtype=torch.bfloat16)
    host.gather(object_pages(canonical, PAGE), 0, 0, 5)
    slabs = object_slabs([run for _offset, run in host.runs(0, 5)])
    if layout != "layer_first":  # a run's pages of one layer and K/V are not one block: callers copy
        assert slabs is None
        return
    assert slabs is not None and len(slabs) == LAYERS * 2 * 2  # per layer and K/V, one slab per run
    assert b"".join(slabs) == canonical.view(torch.uint8).numpy().tobytes()
    slabs[0][:2] = b"\xff\xff"  # the slabs are the pool's own memory
    assert int_view(pool.kv_buffer)[0, 0, 5 * PAGE, 0, 0].item() == -1


@pytest.mark.parametrize("secret", ["", "a tenant secret of 32 bytes ....."])
def test_an_object_written_from_the_pool_is_the_frame_write_back_writes(tmp_path: Path, secret: str) -> None:
    """The direct path (runs of the pool, head and MAC streamed over them) and the copying path (gather,
    then write-back) store byte-identical files; a call that starts inside a group reads the group head
    back and writes it with the pool's pages."""
    pool = fake_pool(slots=16 * PAGE, seed=3)

    def grouped(path: Path, pool: SimpleNamespace) -> KvtierStorage:
        return backend(path, pool, kvtier_pages_per_object=4, kvtier={
            "disk": {"enabled": True, "path": str(path / "disk"), "fsync": False}, "auth": {"secret": secret}})

    direct, copying = grouped(tmp_path / "direct", pool), grouped(tmp_path / "copying", pool)
    assert (direct.manager is not None and direct.manager.auth is not None) == bool(secret)
    copying._direct = False
    assert direct.manager is not None
    direct.manager.write_back = None  # type: ignore[method-assign,assignment]  # never used on the direct path
    for storage in (direct, copying):
        assert storage.batch_set_v1(A[:6], slots([9, 10, 11, 0, 1, 2]), after([])) == [True] * 6
        assert storage.batch_set_v1(A[6:10], slots([3, 4, 5, 6]), after(A[:6])) == [True] * 4
    assert direct.stats()["disk"]["writes"] == 4 and copying.stats()["disk"]["writes"] == 4
    files = {p.relative_to(tmp_path / "direct"): p.read_bytes() for p in (tmp_path / "direct").rglob("*.kvt")}
    assert len(files) == 4  # groups [0,4) [4,8) [8,10) and the first call's [4,6)
    assert files == {p.relative_to(tmp_path / "copying"): p.read_bytes() for p in (tmp_path / "copying").rglob("*.kvt")}
    direct.close()
    copying.close()
    dst = fake_pool(slots=16 * PAGE, seed=4)
    reader = grouped(tmp_path / "direct", dst)
    assert reader.batch_get_v1(A[:10], slots(list(range(10))), after([])) == [True] * 10
    assert same_pages(pool, [9, 10, 11, 0, 1, 2, 3, 4, 5, 6], dst, list(range(10)))
    reader.close()


def test_a_failed_direct_write_is_reported_not_stored(tmp_path: Path) -> None:
    storage = grouped(tmp_path)
    assert storage.manager is not None
    disk = storage.manager.slots[0].tier

    def full(*_a: Any) -> None:
        raise TierUnavailable("disk gone")

    disk.put_parts = full  # type: ignore[method-assign]
    assert storage.batch_set_v1(A[:6], slots(list(range(6))), after([])) == [False] * 6
    assert storage.counters["write_failures"] >= 6 and storage.batch_exists(A[:6], after([])) == 0
    storage.close()


def test_pages_from_the_cache_server_land_straight_in_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache server tier receives raw payloads into several buffers (``recvmsg_into``) as the disk
    tier reads them (``preadv``): ``batch_get_v1`` through a real ``kvtier server`` puts each object
    straight into the pool pages, byte exact, and a byte damaged in transit ends the hit at its object
    (a counted corrupt miss; the server's copy is intact)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from server_support import FlippingProxy, ServerProcess

    def remote_backend(port: int, pool: SimpleNamespace) -> KvtierStorage:
        return backend(tmp_path, pool, kvtier_pages_per_object=4,
                       kvtier={"remote": {"enabled": True, "port": port, "timeout_s": 10.0}})

    src = fake_pool(slots=16 * PAGE, seed=1)
    with ServerProcess(tmp_path) as server:
        writer = remote_backend(server.port, src)
        assert writer.batch_set_v1(A[:8], slots(list(range(8))), after([])) == [True] * 8
        writer.close()

        direct: list[bool] = []
        reader = remote_backend(server.port, fake_pool(slots=16 * PAGE, seed=2))
        read_into = reader._read_into

        def spy(*args: Any) -> Any:
            parts = read_into(*args)
            direct.append(parts is not None)
            return parts

        monkeypatch.setattr(reader, "_read_into", spy)
        assert reader.batch_get_v1(A[:8], slots(list(range(8, 16))), after([])) == [True] * 8
        assert same_pages(src, list(range(8)), reader.mem_pool_host, list(range(8, 16)))
        assert direct == [True, True]
        reader.close()

        # one K row of page 5 (the second object), bf16 bits as the frame carries them: the proxy flips its last byte
        row = PoolView(src).page(5 * PAGE)[1, 0, 3].reshape(-1).view(torch.int16).numpy().tobytes()
        proxy = FlippingProxy(server.port, row)
        try:
            damaged = remote_backend(proxy.address, fake_pool(slots=16 * PAGE, seed=3))
            assert damaged.batch_get_v1(A[:8], slots(list(range(8))), after([])) == [True] * 4 + [False] * 4
            assert proxy.flipped == 1
            assert same_pages(src, [0, 1, 2, 3], damaged.mem_pool_host, [0, 1, 2, 3])
            assert damaged.stats()["remote"]["corrupt"] == 1
            damaged.close()
        finally:
            proxy.close()
