"""Helpers shared by the built-in codecs: geometry checks, parameter validation, payload sections.

Every built-in codec records the chunk geometry it encoded (layers, kv heads, head dim, dtype, tokens)
in its params, so a payload decoded against another KV spec fails with :class:`LayoutError` even
outside the wire format. Params come from a stored header: anything malformed in them is
:class:`CorruptChunk`, never an uncaught ``KeyError``/``TypeError``.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any, TypeVar

import numpy as np
import torch

from kvtier.codec.base import Params
from kvtier.errors import CorruptChunk, LayoutError
from kvtier.layout import KVSpec
from kvtier.tensors import check_chunk, dtype_name

T = TypeVar("T")

_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")


def check_input(chunk: torch.Tensor, spec: KVSpec) -> int:
    """Return the token count of canonical chunk ``chunk``; raise :class:`LayoutError` if it does not
    match ``spec`` (shape ``[layers, 2, T, kv_heads, head_dim]``, dtype, T ≥ 1)."""
    if chunk.dim() != 5 or chunk.shape[2] < 1:
        raise LayoutError(f"expected a canonical chunk [layers, 2, T, heads, dim], got {tuple(chunk.shape)}")
    check_chunk(spec, chunk, int(chunk.shape[2]))
    return int(chunk.shape[2])


def check_finite(x: torch.Tensor, codec: str) -> None:
    """Lossy codecs need finite KV; raise :class:`LayoutError` otherwise (the store is then skipped)."""
    if not bool(torch.isfinite(x).all()):
        raise LayoutError(f"codec {codec!r} needs finite KV values; the chunk holds NaN or inf")


def geometry(spec: KVSpec, tokens: int) -> Params:
    """The geometry record every built-in codec puts in its params."""
    return {"L": spec.num_layers, "H": spec.num_kv_heads, "D": spec.head_dim, "dtype": spec.dtype, "T": tokens}


def check_geometry(params: Params, spec: KVSpec, out: torch.Tensor) -> int:
    """Check that the payload was encoded for ``spec`` and fits ``out``; return the token count.

    Raises :class:`LayoutError` when the stored geometry differs from ``spec``/``out`` and
    :class:`CorruptChunk` when the geometry record itself is missing or malformed.
    """
    stored = (param(params, "L", int), param(params, "H", int), param(params, "D", int))
    dtype = param(params, "dtype", str)
    tokens = param(params, "T", int)
    wanted = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if stored != wanted or dtype != spec.dtype:
        raise LayoutError(
            f"payload was encoded for layers/heads/dim {stored} dtype {dtype}, "
            f"this spec is {wanted} dtype {spec.dtype}"
        )
    expected = spec.chunk_shape(tokens)
    if tuple(out.shape) != expected or out.dtype != spec.torch_dtype:
        raise LayoutError(
            f"destination is {tuple(out.shape)} {dtype_name(out.dtype) if out.is_floating_point() else out.dtype}"
            f", payload decodes to {expected} {spec.dtype}"
        )
    return tokens


def param(params: Params, name: str, kind: type[T], lo: float | None = None, hi: float | None = None) -> T:
    """``params[name]`` checked to be a ``kind`` (int/float/str/bool/list) within ``[lo, hi]``."""
    if not isinstance(params, dict) or name not in params:
        raise CorruptChunk(f"codec params lack {name!r}")
    value: Any = params[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptChunk(f"codec param {name!r} should be {kind.__name__}, got {value!r}")
    number: Any = value
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise CorruptChunk(f"codec param {name!r}={value!r} outside [{lo}, {hi}]")
    return value


def pack_sections(parts: list[bytes | memoryview]) -> bytes:
    """``u32 count, count × u64 length, then the parts`` (little endian)."""
    head = _COUNT.pack(len(parts)) + b"".join(_LEN.pack(memoryview(p).nbytes) for p in parts)
    return b"".join([head, *parts])


def unpack_sections(payload: memoryview | bytes, count: int) -> list[memoryview]:
    """Split a :func:`pack_sections` payload into ``count`` views; :class:`CorruptChunk` on any
    length that does not add up."""
    view = memoryview(payload).cast("B")
    head = _COUNT.size + count * _LEN.size
    if len(view) < head or _COUNT.unpack_from(view, 0)[0] != count:
        raise CorruptChunk(f"payload should start with a table of {count} sections")
    lengths = [_LEN.unpack_from(view, _COUNT.size + i * _LEN.size)[0] for i in range(count)]
    if head + sum(lengths) != len(view):
        raise CorruptChunk(f"sections add up to {head + sum(lengths)} bytes, payload has {len(view)}")
    parts, pos = [], head
    for n in lengths:
        parts.append(view[pos : pos + n])
        pos += n
    return parts


def as_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """Flat byte view of a tensor or array (a contiguous copy only if needed)."""
    if isinstance(t, torch.Tensor):
        t = t.contiguous().view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    return np.ascontiguousarray(t).reshape(-1).view(np.uint8).data


def frombuffer(data: memoryview | bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A read-only 1-D view of ``count`` ``dtype`` items in ``data`` (valid while ``data`` lives; never
    write to it); :class:`CorruptChunk` if ``data`` has another size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if memoryview(data).nbytes != count * itemsize:
        raise CorruptChunk(f"section holds {memoryview(data).nbytes} bytes, expected {count * itemsize}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only; we only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype)


def store_planes(out: torch.Tensor, x: torch.Tensor) -> None:
    """Write float32 reconstruction ``x`` into ``out`` (engine dtype), clamped to ``out``'s finite range.

    The original values were finite in ``out``'s dtype, so clamping never moves a value away from them:
    error bounds still hold, and a value near the top of fp16's range can no longer round to inf.
    """
    if out.dtype != x.dtype and out.dtype.is_floating_point:
        limit = torch.finfo(out.dtype).max
        x = x.clamp(-limit, limit)
    out.copy_(x.view(out.shape))

