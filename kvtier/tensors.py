"""Tensor side of the canonical chunk layout (see :mod:`kvtier.layout`): dtypes, shape checks and the
copies between an engine's KV and canonical chunks. The only core module besides the codecs, frames
and memory that imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvtier.errors import LayoutError
from kvtier.layout import DTYPE_SIZES, KVSpec, check_dtype_name

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}

# A source or destination of KV for ``tokens`` positions: either a tensor shaped
# ``[layers, 2, tokens, kv_heads, head_dim]`` (any strides) or a per-layer sequence of (K, V) tensors
# shaped ``[tokens, kv_heads, head_dim]`` (any strides, e.g. transposed views of an engine's cache).
KVLike = torch.Tensor | Sequence[Sequence[torch.Tensor]]


def dtype_from_name(name: str) -> torch.dtype:
    """Return the torch dtype called ``name``; raise :class:`LayoutError` listing the valid names."""
    check_dtype_name(name)
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`dtype_from_name`."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise LayoutError(f"unsupported KV dtype {dtype}; expected one of {sorted(_DTYPES)}")


def check_chunk(spec: KVSpec, tensor: torch.Tensor, tokens: int) -> None:
    """Raise :class:`LayoutError` unless ``tensor`` is a canonical chunk of ``tokens`` tokens."""
    expected = spec.chunk_shape(tokens)
    if tuple(tensor.shape) != expected or tensor.dtype != spec.torch_dtype:
        raise LayoutError(
            f"expected a chunk of shape {expected} and dtype {spec.dtype}, "
            f"got shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
        )


def kv_length(kv: KVLike) -> int:
    """Number of token positions ``kv`` covers."""
    if isinstance(kv, torch.Tensor):
        return int(kv.shape[2])
    return int(kv[0][0].shape[0])


def check_kv(spec: KVSpec, kv: KVLike, min_tokens: int) -> None:
    """Raise :class:`LayoutError` unless ``kv`` matches ``spec`` and covers ``min_tokens`` positions."""
    if isinstance(kv, torch.Tensor):
        if kv.dim() != 5 or kv.shape[0] != spec.num_layers or kv.shape[1] != 2 or tuple(
            kv.shape[3:]
        ) != (spec.num_kv_heads, spec.head_dim):
            raise LayoutError(
                f"expected KV of shape {spec.chunk_shape(min_tokens)[:2]}+(T,)+"
                f"{(spec.num_kv_heads, spec.head_dim)}, got {tuple(kv.shape)}"
            )
        dtype = kv.dtype
    else:
        if len(kv) != spec.num_layers:
            raise LayoutError(f"expected {spec.num_layers} layers of (K, V), got {len(kv)}")
        first = kv[0][0]
        if tuple(first.shape[1:]) != (spec.num_kv_heads, spec.head_dim):
            raise LayoutError(
                f"expected per-layer K of shape (T, {spec.num_kv_heads}, {spec.head_dim}), "
                f"got {tuple(first.shape)}"
            )
        dtype = first.dtype
    if dtype != spec.torch_dtype:
        raise LayoutError(f"expected KV dtype {spec.dtype}, got {dtype}")
    if kv_length(kv) < min_tokens:
        raise LayoutError(f"KV covers {kv_length(kv)} tokens, need at least {min_tokens}")


def copy_in(chunk: torch.Tensor, kv: KVLike, start: int, end: int, *, one_thread: bool = False) -> None:
    """Copy positions ``[start, end)`` of ``kv`` into canonical ``chunk[:, :, :end-start]``.

    By default one ``copy_`` per chunk: torch's copy kernel uses every intra-op thread on sliced views
    (measured 0.9x of a contiguous ``copy_`` on a quiet 2-core machine; single-threaded numpy reached
    0.56x). ``one_thread``: see :func:`copy_out`."""
    n = end - start
    copy = copy_one_thread if one_thread else _copy
    if isinstance(kv, torch.Tensor):
        copy(chunk[:, :, :n], kv[:, :, start:end])
        return
    for layer, (k, v) in enumerate(kv):
        copy(chunk[layer, 0, :n], k[start:end])
        copy(chunk[layer, 1, :n], v[start:end])


def _run_view(kv: torch.Tensor, start: int, count: int, chunk_tokens: int) -> torch.Tensor:
    """Positions ``[start, start + count * chunk_tokens)`` of ``kv`` seen as ``[count, L, 2, C, H, D]``."""
    return kv[:, :, start : start + count * chunk_tokens].unflatten(2, (count, chunk_tokens)).permute(2, 0, 1, 3, 4, 5)


def copy_in_run(run: torch.Tensor, kv: KVLike, start: int, *, one_thread: bool = False) -> None:
    """Copy ``run.shape[0]`` full chunks of ``kv`` from position ``start`` into ``run`` (consecutive
    arena slots, ``[k, L, 2, C, H, D]``): one copy for the whole run when ``kv`` is one tensor.
    ``one_thread``: see :func:`copy_out`."""
    count, c = int(run.shape[0]), int(run.shape[3])
    if isinstance(kv, torch.Tensor):
        (copy_one_thread if one_thread else _copy)(run, _run_view(kv, start, count, c))
        return
    for i in range(count):
        copy_in(run[i], kv, start + i * c, start + (i + 1) * c, one_thread=one_thread)


def copy_out_run(run: torch.Tensor, kv: KVLike, start: int, *, one_thread: bool = False) -> None:
    """Inverse of :func:`copy_in_run`."""
    count, c = int(run.shape[0]), int(run.shape[3])
    if isinstance(kv, torch.Tensor):
        (copy_one_thread if one_thread else _copy)(_run_view(kv, start, count, c), run)
        return
    for i in range(count):
        copy_out(run[i], kv, start + i * c, start + (i + 1) * c, one_thread=one_thread)


def copy_out(chunk: torch.Tensor, kv: KVLike, start: int, end: int, *, one_thread: bool = False) -> None:
    """Copy canonical ``chunk[:, :, :end-start]`` into positions ``[start, end)`` of ``kv``.

    ``one_thread``: copy on the calling thread only, for callers whose other cores are busy (e.g. with
    reads in flight): torch splits a large ``copy_`` over all its threads and waits for the slowest,
    which on a busy core is several times slower than one thread's copy."""
    n = end - start
    copy = copy_one_thread if one_thread else _copy
    if isinstance(kv, torch.Tensor):
        copy(kv[:, :, start:end], chunk[:, :, :n])
        return
    for layer, (k, v) in enumerate(kv):
        copy(k[start:end], chunk[layer, 0, :n])
        copy(v[start:end], chunk[layer, 1, :n])


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_one_thread(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` on the calling thread only: numpy on a same-size integer view of CPU tensors of
    one dtype and shape (any strides, bytes copied exactly; numpy releases the GIL for the copy), else
    ``copy_``. torch would wake its intra-op threads, which an engine's forward pass is using."""
    if (dst.device.type != "cpu" or src.device.type != "cpu" or dst.dtype != src.dtype or dst.dim() == 0
            or dst.shape != src.shape or dst.element_size() not in _SAME_SIZE_INT):
        dst.copy_(src)
        return
    np.copyto(int_view(dst.detach()).numpy(), int_view(src.detach()).numpy())


def int_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as a tensor of the same-size integer type (a view; the tensor itself if it is
    one): what numpy can take without a dtype of its own (bfloat16, float8) and copies bytes exactly."""
    as_int = _SAME_SIZE_INT[tensor.element_size()]
    return tensor if tensor.dtype == as_int else tensor.view(as_int)


def plane_views(kv: KVLike) -> list[memoryview] | None:
    """Flat byte views of ``kv``'s planes in canonical order (layer 0 K, layer 0 V, layer 1 K, ...),
    each over every position of its plane, when every plane is a contiguous CPU tensor: then the
    positions ``[start, end)`` of a plane are bytes ``[start * row, end * row)`` of its view (``row``:
    the plane's bytes per position), and one chunk's canonical bytes are those runs in order.
    ``None`` otherwise (e.g. transposed or GPU planes)."""
    planes = ([kv[layer, j] for layer in range(kv.shape[0]) for j in (0, 1)] if isinstance(kv, torch.Tensor)
              else [t for k, v in kv for t in (k, v)])
    views = []
    for plane in planes:
        if plane.device.type != "cpu" or not plane.is_contiguous() or plane.numel() == 0 or plane.requires_grad:
            return None
        views.append(plane.view(torch.uint8).reshape(-1).numpy().data)
    return views
