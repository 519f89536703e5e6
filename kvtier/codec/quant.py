"""Quantizing codecs: ``int8``, ``fp8`` (e4m3) and ``kivi`` (2-bit).

All work in float32 on the chunk viewed as ``[layers, 2, T, C]`` (``C = kv_heads * head_dim``) and
write the result in the engine dtype. Error bounds below are for the float32 reconstruction ``x̂``; the
final cast to the engine dtype adds at most its rounding ``u·|x̂|`` (``u`` = 2^-8 bf16, 2^-11 fp16,
2^-24 fp32). :func:`error_bound` returns the bound element by element so tests can assert it. Input
values must be finite (else :class:`LayoutError` at encode); decode raises :class:`CorruptChunk` on
any payload whose sections do not have exactly the sizes the geometry implies.

* ``int8``: symmetric, ``s = absmax/127`` per group, ``q = round(x/s)``; ``|x - x̂| ≤ s/2``. Groups:
  ``key_axis``/``value_axis`` each ``"channel"`` (one scale per layer and channel over the chunk's
  tokens) or ``"token"`` (one scale per layer and token over all channels). Default: keys per channel,
  values per token (the outlier structure KIVI describes). 8.0 bits + scales.
* ``fp8``: ``x/s`` cast to float8 e4m3 with ``s = absmax/448`` per layer, K/V and channel;
  ``|x - x̂| ≤ 2^-4·|x| + 2^-10·s`` (3 mantissa bits; subnormal spacing 2^-9·s). 8.0 bits + scales.
* ``kivi``: asymmetric 2-bit, ``x̂ = min + q·scale``, ``q ∈ {0..3}``, ``scale = (max - min)/3`` per group:
  keys per channel over groups of ``group`` tokens, values per token over groups of ``group`` channels.
  ``min`` is stored rounded down and ``scale`` rounded up (fp16, or fp32 if the values exceed fp16's
  range), so ``|x - x̂| ≤ scale/2`` with the stored scale, i.e. about ``(max - min)/6``. With
  ``group=32``: 2 bits + 1 bit of fp16 min/scale per value (5.3x smaller than bf16). KIVI's
  full-precision window of recent tokens does not apply here: a stored chunk is a finished prefix.
"""

from __future__ import annotations

import torch

from kvtier.codec._common import (
    as_bytes,
    check_finite,
    check_geometry,
    check_input,
    frombuffer,
    geometry,
    pack_sections,
    param,
    store_planes,
    unpack_sections,
)
from kvtier.codec.base import Codec, Params, register_codec
from kvtier.errors import ConfigError, CorruptChunk
from kvtier.layout import KVSpec

_AXES = ("channel", "token")
FP8_MAX = 448.0


def _planes(chunk: torch.Tensor) -> torch.Tensor:
    """``[L, 2, T, C]`` float32 copy of a canonical chunk."""
    L, _, T, H, D = chunk.shape
    return chunk.reshape(L, 2, T, H * D).float()


_bytes = as_bytes


# ---- int8 ----------------------------------------------------------------------------------------
def _int8_scale(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Scale per group for ``x`` = one K or V plane ``[L, T, C]``; keeps dims for broadcasting."""
    dim = 1 if axis == "channel" else 2
    absmax = x.abs().amax(dim=dim, keepdim=True)
    return torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))


class Int8Codec(Codec):
    """Symmetric int8 with float32 scales; see the module docstring for groups and the bound."""

    name = "int8"
    lossless = False

    def __init__(self, key_axis: str = "channel", value_axis: str = "token") -> None:
        for axis in (key_axis, value_axis):
            if axis not in _AXES:
                raise ConfigError(f"int8 axis must be one of {_AXES}, got {axis!r}")
        self.axes = (key_axis, value_axis)

    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]:
        tokens = check_input(chunk, spec)
        x = _planes(chunk)
        check_finite(x, self.name)
        scales, qs = [], []
        for i, axis in enumerate(self.axes):
            s = _int8_scale(x[:, i], axis)
            scales.append(s.reshape(-1))
            qs.append(torch.round(x[:, i] / s).clamp_(-127, 127).to(torch.int8))
        payload = pack_sections([_bytes(torch.cat(scales)), _bytes(torch.stack(qs, 1))])
        return payload, {**geometry(spec, tokens), "key_axis": self.axes[0], "value_axis": self.axes[1]}

    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None:
        tokens = check_geometry(params, spec, out)
        axes = (param(params, "key_axis", str), param(params, "value_axis", str))
        if any(a not in _AXES for a in axes):
            raise CorruptChunk(f"int8 axes {axes} not in {_AXES}")
        L, C = spec.num_layers, spec.num_kv_heads * spec.head_dim
        shapes = [(L, 1, C) if a == "channel" else (L, tokens, 1) for a in axes]
        n_scales = sum(a * b * c for a, b, c in shapes)
        scale_part, q_part = unpack_sections(payload, 2)
        scales = frombuffer(scale_part, torch.float32, n_scales)
        q = frombuffer(q_part, torch.int8, L * 2 * tokens * C).view(L, 2, tokens, C)
        k_scale, v_scale = scales.split([a * b * c for a, b, c in shapes])
        x = torch.empty(L, 2, tokens, C)
        torch.mul(q[:, 0], k_scale.view(shapes[0]), out=x[:, 0])
        torch.mul(q[:, 1], v_scale.view(shapes[1]), out=x[:, 1])
        store_planes(out, x)

    def error_bound(self, chunk: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on ``|x - x̂|`` before the cast to the engine dtype (shape of ``chunk``)."""
        x = _planes(chunk)
        bound = torch.empty_like(x)
        for i, axis in enumerate(self.axes):
            bound[:, i] = (_int8_scale(x[:, i], axis) / 2).expand_as(x[:, i])
        return bound.view(chunk.shape)


# ---- fp8 -----------------------------------------------------------------------------------------
def _fp8_scale(x: torch.Tensor) -> torch.Tensor:
    absmax = x.abs().amax(dim=2, keepdim=True)  # per layer, K/V, channel
    return torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))


class Fp8Codec(Codec):
    """float8 e4m3 (``torch.float8_e4m3fn``) with a float32 scale per layer, K/V and channel."""

    name = "fp8"
    lossless = False

    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]:
        tokens = check_input(chunk, spec)
        x = _planes(chunk)
        check_finite(x, self.name)
        s = _fp8_scale(x)
        q = (x / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return pack_sections([_bytes(s), _bytes(q)]), geometry(spec, tokens)

    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None:
        tokens = check_geometry(params, spec, out)
        L, C = spec.num_layers, spec.num_kv_heads * spec.head_dim
        scale_part, q_part = unpack_sections(payload, 2)
        s = frombuffer(scale_part, torch.float32, L * 2 * C).view(L, 2, 1, C)
        q = frombuffer(q_part, torch.uint8, L * 2 * tokens * C).view(torch.float8_e4m3fn)
        x = q.view(L, 2, tokens, C).float()
        if not bool(torch.isfinite(x).all()):  # e4m3fn has NaN codes; the encoder never writes them
            raise CorruptChunk("fp8 payload holds NaN codes")
        store_planes(out, x.mul_(s))

    def error_bound(self, chunk: torch.Tensor) -> torch.Tensor:
        x = _planes(chunk)
        return (x.abs() * 2.0**-4 + _fp8_scale(x) * 2.0**-10).view(chunk.shape)


# ---- kivi ----------------------------------------------------------------------------------------
def _group_minmax(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over consecutive groups of ``group`` along ``dim`` (last group may be
    short: padded by repeating the last element, which changes neither)."""
    n = x.shape[dim]
    pad = -n % group
    if pad:
        edge = x.narrow(dim, n - 1, 1)
        x = torch.cat([x, edge.expand(*[pad if d == dim else s for d, s in enumerate(x.shape)])], dim)
    shape = [*x.shape[:dim], x.shape[dim] // group, group, *x.shape[dim + 1 :]]
    g = x.reshape(shape)
    return g.amin(dim + 1), g.amax(dim + 1)


def _expand(stat: torch.Tensor, dim: int, group: int, n: int) -> torch.Tensor:
    return stat.repeat_interleave(group, dim).narrow(dim, 0, n)


def _kivi_stats(x: torch.Tensor, dim: int, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, scale)`` per group, rounded to ``dtype`` so that ``[min, min + 3·scale]`` still covers
    the group: min rounded down, scale rounded up."""
    lo, hi = _group_minmax(x, dim, group)
    mn = lo.to(dtype)
    mn = torch.where(mn.float() > lo, torch.nextafter(mn, torch.full_like(mn, float("-inf"))), mn)
    exact = (hi - mn.float()) / 3.0
    sc = exact.to(dtype)
    sc = torch.where(sc.float() < exact, torch.nextafter(sc, torch.full_like(sc, float("inf"))), sc)
    return mn, sc


def _kivi_scale_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16 min/scale unless the values come near fp16's range (65504), then fp32."""
    return torch.float32 if float(x.abs().max()) > 16384.0 else torch.float16


def pack2(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 values in 0..3 four to a byte (zero padded to a multiple of 4)."""
    flat = q.reshape(-1)
    pad = -flat.numel() % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    v = flat.view(-1, 4)
    return v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)


def unpack2(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack2`: the first ``count`` values as uint8."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & 3).view(-1)[:count]


class KiviCodec(Codec):
    """2-bit KIVI quantization; keys per channel, values per token, in groups of ``group``."""

    name = "kivi"
    lossless = False

    def __init__(self, group: int = 32) -> None:
        if group < 1:
            raise ConfigError(f"kivi group must be >= 1, got {group}")
        self.group = group

    @staticmethod
    def _dims() -> tuple[int, int]:
        return 1, 2  # keys: groups over tokens (dim 1 of [L, T, C]); values: over channels (dim 2)

    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]:
        tokens = check_input(chunk, spec)
        x = _planes(chunk)
        check_finite(x, self.name)
        sdtype = _kivi_scale_dtype(x)
        sections: list[bytes | memoryview] = []
        qs = []
        for i, dim in enumerate(self._dims()):
            mn, sc = self._stats(x[:, i], dim, sdtype)
            m, s = _expand(mn.float(), dim, self.group, x.shape[dim + 1]), _expand(
                sc.float(), dim, self.group, x.shape[dim + 1]
            )
            safe = torch.where(s > 0, s, torch.ones_like(s))
            qs.append(torch.round((x[:, i] - m) / safe).clamp_(0, 3).to(torch.uint8))
            sections += [_bytes(mn), _bytes(sc)]
        sections.append(_bytes(pack2(torch.stack(qs, 1))))
        params = {**geometry(spec, tokens), "group": self.group, "scale_dtype": str(sdtype).split(".")[1]}
        return pack_sections(sections), params

    def _stats(self, plane: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return _kivi_stats(plane, dim, self.group, dtype)

    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None:
        tokens = check_geometry(params, spec, out)
        group = param(params, "group", int, 1, 1 << 20)
        sname = param(params, "scale_dtype", str)
        if sname not in ("float16", "float32"):
            raise CorruptChunk(f"kivi scale dtype {sname!r}")
        sdtype = getattr(torch, sname)
        L, C = spec.num_layers, spec.num_kv_heads * spec.head_dim
        parts = unpack_sections(payload, 5)
        sizes = (tokens, C)  # extent of dims 1 and 2 of a [L, T, C] plane
        x = torch.empty(L, 2, tokens, C)
        total = L * 2 * tokens * C
        q = unpack2(frombuffer(parts[4], torch.uint8, (total + 3) // 4), total).view(L, 2, tokens, C)
        for i, dim in enumerate(self._dims()):
            groups = -(-sizes[dim - 1] // group)
            shape = (L, groups, C) if dim == 1 else (L, tokens, groups)
            count = shape[0] * shape[1] * shape[2]
            mn = frombuffer(parts[2 * i], sdtype, count).view(shape).float()
            sc = frombuffer(parts[2 * i + 1], sdtype, count).view(shape).float()
            if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(sc).all())):
                raise CorruptChunk("kivi scales are not finite")
            n = sizes[dim - 1]
            torch.add(_expand(mn, dim, group, n), q[:, i] * _expand(sc, dim, group, n), out=x[:, i])
        store_planes(out, x)

    def error_bound(self, chunk: torch.Tensor) -> torch.Tensor:
        x = _planes(chunk)
        bound = torch.empty_like(x)
        for i, dim in enumerate(self._dims()):
            _, sc = self._stats(x[:, i], dim, _kivi_scale_dtype(x))
            bound[:, i] = _expand(sc.float() / 2, dim, self.group, x.shape[dim + 1])
        return bound.view(chunk.shape)


register_codec(Int8Codec())
register_codec(Fp8Codec())
register_codec(KiviCodec())
