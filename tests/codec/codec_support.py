"""Helpers for the codec tests: codec instances under test, random chunks, the documented bounds."""

from __future__ import annotations

import torch

from kvtier.codec.base import Codec, get_codec
from kvtier.codec.cachegen import CacheGenCodec
from kvtier.codec.lossless import Lz4Codec, ZstdCodec
from kvtier.codec.quant import Fp8Codec, Int8Codec, KiviCodec
from kvtier.layout import KVSpec

DTYPES = ("bfloat16", "float16", "float32")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative rounding error of a cast to ``dtype`` (round to nearest)."""
    return float(torch.finfo(dtype).eps) / 2

LOSSLESS: dict[str, Codec] = {
    "raw": get_codec("raw"),
    "zstd": get_codec("zstd"),
    "zstd-plain": ZstdCodec(level=3, shuffle=False),
    "lz4": get_codec("lz4"),
    "lz4-plain": Lz4Codec(shuffle=False),
}
LOSSY: dict[str, Codec] = {
    "int8": get_codec("int8"),
    "int8-token-channel": Int8Codec(key_axis="token", value_axis="channel"),
    "fp8": Fp8Codec(),
    "kivi": get_codec("kivi"),
    "kivi-g7": KiviCodec(group=7),
    "cachegen": get_codec("cachegen"),
    "cachegen-ans": get_codec("cachegen-ans"),
    "cachegen-g4-groups": CacheGenCodec(alpha_k=(0.3, 0.6), alpha_v=(0.4, 0.7), anchor_every=4),
    "cachegen-nodelta": CacheGenCodec(delta=False, entropy="ans", anchor_every=3),
}
ALL = {**LOSSLESS, **LOSSY}


def spec_for(dtype: str = "float32", layers: int = 3, heads: int = 2, dim: int = 8, chunk: int = 32) -> KVSpec:
    return KVSpec(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=dtype, chunk_tokens=chunk)


def kv_like(spec: KVSpec, tokens: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A KV-like chunk: per-channel offsets and scales (outlier channels), a large first token."""
    g = torch.Generator().manual_seed(seed)
    shape = spec.chunk_shape(tokens)
    channel_scale = torch.exp(torch.randn(shape[0], 2, 1, shape[3], shape[4], generator=g))
    offset = torch.randn(shape[0], 2, 1, shape[3], shape[4], generator=g)
    x = (torch.randn(shape, generator=g) * channel_scale + offset) * scale
    x[:, :, 0] *= 4  # attention-sink-like first token
    return x.to(spec.torch_dtype)


def roundtrip(codec: Codec, chunk: torch.Tensor, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    payload, params = codec.encode(chunk, spec)
    out = torch.full_like(chunk, 7) if out is None else out
    codec.decode(memoryview(bytes(payload)), params, spec, out)
    return out


def assert_within_bound(codec: Codec, chunk: torch.Tensor, decoded: torch.Tensor) -> None:
    """``|x - x̂| <= bound + u·|x̂| + d/2`` (+ float32 slack), the documented bound of ``codec``.

    ``d`` is the spacing of the engine dtype's subnormals: the cast of a tiny reconstruction rounds to
    an absolute grid there, not a relative one (fp16's is 2^-24). The float32 slack is relative to the
    chunk's largest magnitude: reconstructions such as ``anchor + q·step`` round at the scale of their
    terms, not of the (possibly tiny) result.
    """
    x = chunk.float()
    y = decoded.float()
    bound = codec.error_bound(chunk)  # type: ignore[attr-defined]
    scale = float(x.abs().max()) if x.numel() else 0.0
    info = torch.finfo(chunk.dtype)
    subnormal_half = float(info.smallest_normal) * float(info.eps) / 2
    slack = unit_roundoff(chunk.dtype) * y.abs() + subnormal_half + 1e-6 * (scale + bound) + 1e-30
    excess = (x - y).abs() - bound - slack
    assert float(excess.max()) <= 0, f"{codec.name}: error exceeds its bound by {float(excess.max())}"
