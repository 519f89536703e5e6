"""Layout adapters between vLLM paged KV tensors and canonical chunks: exact round trips on CPU tensors
for every supported layout, and the CPU layout checked against vLLM's own CPU kernel when installed.

``LAYOUT_TEST_DEVICE=cuda`` (scripts/gpu-check.sh) puts the paged tensors on the GPU for the round
trips, with canonical chunks staying in CPU memory as the connector keeps them."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kvtier.errors import LayoutError
from kvtier.integrations.vllm import layout as vl

NB, BS, H, D = 6, 16, 3, 8
DEVICE = torch.device(os.environ.get("LAYOUT_TEST_DEVICE", "cpu"))


def _paged(layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _cpu_paged(layout, dtype).to(DEVICE)


def _cpu_paged(layout: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if layout == "cpu":
        return torch.randn(NB, H, BS, 2 * D, generator=gen).to(dtype)
    if layout == "bhnc":  # logical [B, H, N, 2D] over a physical [B, N, H, 2D] buffer (vLLM's LBNHC)
        return torch.randn(NB, BS, H, 2 * D, generator=gen).to(dtype).transpose(1, 2)
    if layout == "flash":
        return torch.randn(2, NB, BS, H, D, generator=gen).to(dtype)
    return torch.randn(NB, 2, BS, H, D, generator=gen).to(dtype)  # flashinfer


def _kv(tokens: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(tokens, H, D, generator=gen).to(dtype).to(DEVICE),
            torch.randn(tokens, H, D, generator=gen).to(dtype).to(DEVICE))


@pytest.mark.parametrize("layout", vl.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_gather_round_trip(layout: str, dtype: torch.dtype) -> None:
    paged = _paged(layout, dtype)
    before = paged.clone()
    # a partial first block, two whole blocks, a partial last block, blocks out of order
    block_ids = [4, 1, 5, 2]
    start, end = 5, 3 * BS + 7
    slots = vl.slot_mapping(block_ids, BS, start, end)
    k, v = _kv(end - start, dtype)
    vl.scatter(layout, paged, slots, k, v, D)
    got_k, got_v = vl.gather(layout, paged, slots, D)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    # every other slot is untouched
    others = torch.tensor(sorted(set(range(NB * BS)) - set(slots.tolist())))
    ok, ov = vl.gather(layout, paged, others, D)
    bk, bv = vl.gather(layout, before, others, D)
    assert torch.equal(ok, bk) and torch.equal(ov, bv)
    # gather then scatter back is the identity
    again = before.clone()
    vl.scatter(layout, again, slots, *vl.gather(layout, before, slots, D), D)
    assert torch.equal(again, before)


@pytest.mark.parametrize("layout", vl.LAYOUTS)
def test_layers_round_trip_canonical(layout: str) -> None:
    layers = [_paged(layout) for _ in range(3)]
    slots = vl.slot_mapping([3, 0, 2], BS, 0, 2 * BS + 3)
    canon = torch.randn(3, 2, len(slots), H, D)
    vl.scatter_layers(layout, layers, slots, D, canon)
    out = torch.empty_like(canon)
    vl.gather_layers(layout, layers, slots, D, out)
    assert torch.equal(out, canon)
    # into a strided destination (a window of a larger staging buffer)
    staging = torch.zeros(3, 2, len(slots) + 10, H, D)
    vl.gather_layers(layout, layers, slots, D, staging[:, :, 10:])
    assert torch.equal(staging[:, :, 10:], canon)


def _layers_in_one_buffer(layout: str, count: int) -> list[torch.Tensor]:
    """``count`` layers back to back in one buffer, as vLLM's CPU backend allocates them."""
    one = _paged(layout)
    buf = torch.randn(count, *one.shape, generator=torch.Generator().manual_seed(3))
    if layout == "bhnc":  # keep the physical [B, N, H, 2D] order of _paged
        buf = torch.randn(count, NB, BS, H, 2 * D, generator=torch.Generator().manual_seed(3)).transpose(2, 3)
    return [buf[i] for i in range(count)]


@pytest.mark.parametrize("layout", vl.LAYOUTS)
@pytest.mark.parametrize("one_buffer", [True, False])
@pytest.mark.parametrize(("start", "end"), [(0, 3 * BS + 5), (BS, 3 * BS), (5, 4 * BS + 7), (3, 9), (0, 7),
                                            (2 * BS, 2 * BS + 1), (4, 4)])
@pytest.mark.parametrize("one_thread", [False, True])
def test_span_moves_what_the_slot_mapping_moves(layout: str, one_buffer: bool, start: int, end: int,
                                                one_thread: bool) -> None:
    """scatter_span / gather_span (whole blocks as block copies, runs of consecutive ids at once) write
    and read exactly the bytes of the per-token slot mapping, for partial and whole blocks alike, with
    torch's copy or the calling thread's (the connector's chunk-by-chunk loads and saves)."""
    layers = _layers_in_one_buffer(layout, 3) if one_buffer else [_paged(layout) for _ in range(3)]
    stacked = vl.stack_layers(layers)
    assert (stacked is not None) == one_buffer
    block_ids = [1, 2, 5, 0, 3]  # a run (1, 2), then scattered ids
    canon = torch.randn(3, 2, end - start, H, D, generator=torch.Generator().manual_seed(4))
    expected = [layer.clone() for layer in layers]
    vl.scatter_layers(layout, expected, vl.slot_mapping(block_ids, BS, start, end), D, canon)
    vl.scatter_span(layout, layers, block_ids, start, end, canon, D, stacked, one_thread=one_thread)
    for got, want in zip(layers, expected):
        assert torch.equal(got, want)  # nothing else touched either
    out = torch.zeros(3, 2, end - start + 4, H, D)[:, :, 4:]  # a strided window, as a part of a chunk
    vl.gather_span(layout, layers, block_ids, start, end, out, D, stacked, one_thread=one_thread)
    assert torch.equal(out, canon)


def test_stack_layers_only_for_one_evenly_spaced_buffer() -> None:
    layers = _layers_in_one_buffer("cpu", 4)
    stacked = vl.stack_layers(layers)
    assert stacked is not None and stacked.shape == (4, *layers[0].shape)
    stacked[2, 1, 0, 0, 0] = 42.0  # a view: writes land in the layer itself
    assert layers[2][1, 0, 0, 0] == 42.0
    assert vl.stack_layers([_paged("cpu") for _ in range(3)]) is None  # separate allocations
    assert vl.stack_layers([layers[0], layers[2], layers[1]]) is None  # not in order
    assert vl.stack_layers([layers[0], layers[1].to(torch.bfloat16)]) is None


def test_span_rejects_a_short_block_table() -> None:
    layers = [_paged("cpu")]
    with pytest.raises(LayoutError):
        vl.scatter_span("cpu", layers, [1, 2], 0, 3 * BS, torch.zeros(1, 2, 3 * BS, H, D), D)


def test_cpu_layout_is_k_transposed_then_v() -> None:
    """Element positions of vLLM's CPU layout, spelled out independently of the adapter."""
    paged = torch.zeros(NB, H, BS, 2 * D)
    slots = vl.slot_mapping([2, 5], BS, 0, BS + 3)
    k, v = _kv(len(slots))
    vl.scatter("cpu", paged, slots, k, v, D)
    for t, slot in enumerate(slots.tolist()):
        blk, off = divmod(slot, BS)
        for h in range(H):
            flat = paged[blk, h].reshape(-1)
            assert torch.equal(flat[torch.arange(D) * BS + off], k[t, h])  # K^T: [head_dim, block_size]
            assert torch.equal(flat[BS * D + off * D + torch.arange(D)], v[t, h])  # then V: [block_size, head_dim]


def test_flash_layout_positions() -> None:
    paged = torch.zeros(2, NB, BS, H, D)
    slots = vl.slot_mapping([1], BS, 0, 4)
    k, v = _kv(4)
    vl.scatter("flash", paged, slots, k, v, D)
    assert torch.equal(paged[0, 1, :4], k) and torch.equal(paged[1, 1, :4], v)


def test_slot_mapping_and_errors() -> None:
    assert vl.slot_mapping([7, 3], 4, 2, 6).tolist() == [30, 31, 12, 13]
    with pytest.raises(LayoutError):
        vl.slot_mapping([7], 4, 0, 5)
    with pytest.raises(LayoutError):
        vl.token_views("cpu", torch.zeros(2, 3, 4, 5), D)
    with pytest.raises(LayoutError):
        vl.token_views("nope", torch.zeros(2, 3, 4, 2 * D), D)
    with pytest.raises(LayoutError):  # CPU pages must be contiguous slabs
        vl.token_views("cpu", torch.zeros(NB, BS, H, 2 * D).transpose(1, 2), D)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layout_matches_vllm_kernel(dtype: torch.dtype) -> None:
    """The adapter reads back exactly what vLLM's CPU kernel wrote (block size 128, SmolLM2 geometry)."""
    assert vl.verify_cpu_layout(dtype, 128, 3, 64)
