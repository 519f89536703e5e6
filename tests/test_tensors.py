"""The copies between an engine's KV and canonical chunks: the calling-thread copy (``one_thread``) must
place exactly the bytes torch's ``copy_`` places, for every source shape the engine accepts."""

from __future__ import annotations

import pytest
import torch

from kvtier.layout import KVSpec
from kvtier.tensors import copy_in, copy_in_run, copy_one_thread, copy_out, copy_out_run

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16", chunk_tokens=4)
TOKENS = 13  # three full chunks and a partial one


def _kv(layout: str) -> torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]:
    """Random KV of ``TOKENS`` positions in one of the layouts the engine accepts."""
    full = torch.randn(SPEC.num_layers, 2, TOKENS, SPEC.num_kv_heads, SPEC.head_dim).to(SPEC.torch_dtype)
    if layout == "tensor":
        return full
    if layout == "layers":  # per-layer (K, V), each contiguous
        return [(full[i, 0].clone(), full[i, 1].clone()) for i in range(SPEC.num_layers)]
    # per-layer views of a [heads, tokens, dim] cache: last axis contiguous, tokens strided
    return [(full[i, 0].transpose(0, 1).contiguous().transpose(0, 1),
             full[i, 1].transpose(0, 1).contiguous().transpose(0, 1)) for i in range(SPEC.num_layers)]


def _dense(kv: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    if isinstance(kv, torch.Tensor):
        return kv
    return torch.stack([torch.stack([k, v]) for k, v in kv])


def _empty_like(kv: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]):
    if isinstance(kv, torch.Tensor):
        return torch.zeros_like(kv)
    return [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in kv]


@pytest.mark.parametrize("layout", ["tensor", "layers", "strided"])
@pytest.mark.parametrize("one_thread", [False, True])
def test_chunk_round_trip(layout: str, one_thread: bool) -> None:
    src = _kv(layout)
    c = SPEC.chunk_tokens
    dst = _empty_like(src)
    for start in range(0, TOKENS, c):
        end = min(start + c, TOKENS)
        chunk = torch.full(SPEC.chunk_shape(c), 7.0, dtype=SPEC.torch_dtype)
        copy_in(chunk, src, start, end, one_thread=one_thread)
        assert torch.equal(chunk[:, :, : end - start], _dense(src)[:, :, start:end])
        assert (chunk[:, :, end - start :] == 7.0).all()  # nothing past the chunk's positions
        copy_out(chunk, dst, start, end, one_thread=one_thread)
    assert torch.equal(_dense(dst), _dense(src))


@pytest.mark.parametrize("layout", ["tensor", "layers", "strided"])
@pytest.mark.parametrize("one_thread", [False, True])
def test_run_round_trip(layout: str, one_thread: bool) -> None:
    src = _kv(layout)
    c, count, start = SPEC.chunk_tokens, 2, 4
    run = torch.zeros((count, *SPEC.chunk_shape(c)), dtype=SPEC.torch_dtype)
    copy_in_run(run, src, start, one_thread=one_thread)
    for i in range(count):
        assert torch.equal(run[i], _dense(src)[:, :, start + i * c : start + (i + 1) * c])
    dst = _empty_like(src)
    copy_out_run(run, dst, start, one_thread=one_thread)
    expected = torch.zeros_like(_dense(src))
    expected[:, :, start : start + count * c] = _dense(src)[:, :, start : start + count * c]
    assert torch.equal(_dense(dst), expected)


def test_one_thread_copies_any_strides_exactly() -> None:
    """A source whose last axis is not contiguous (a transposed view) is copied element by element
    through a same-size integer view, bit for bit."""
    src = torch.randn(SPEC.num_layers, 2, TOKENS, SPEC.head_dim, SPEC.num_kv_heads).to(SPEC.torch_dtype)
    kv = src.transpose(3, 4)
    chunk = torch.zeros(SPEC.chunk_shape(SPEC.chunk_tokens), dtype=SPEC.torch_dtype)
    copy_in(chunk, kv, 0, SPEC.chunk_tokens, one_thread=True)
    assert torch.equal(chunk, kv[:, :, : SPEC.chunk_tokens])


def test_copy_one_thread_converts_dtypes_through_torch() -> None:
    src = torch.randn(4, 8)
    dst = torch.zeros(8, 4, dtype=torch.bfloat16).t()
    copy_one_thread(dst, src)
    assert torch.equal(dst, src.to(torch.bfloat16))
