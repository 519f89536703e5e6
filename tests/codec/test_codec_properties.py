"""Hypothesis: random geometries, token counts, scales and dtypes round-trip for every codec."""

from __future__ import annotations

import pytest
import torch
from codec_support import ALL, DTYPES, LOSSY, assert_within_bound, roundtrip, spec_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.errors import LayoutError


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    dtype = draw(st.sampled_from(DTYPES))
    spec = spec_for(dtype, layers=draw(st.integers(1, 4)), heads=draw(st.integers(1, 3)),
                    dim=draw(st.integers(1, 12)), chunk=64)
    tokens = draw(st.integers(1, 40))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0, 1000.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.chunk_shape(tokens), generator=g) * scale
    if draw(st.booleans()):  # heavy-tailed outliers in a few channels
        x[..., 0] *= 50
    return spec, x.clamp(-6e4, 6e4).to(spec.torch_dtype)  # inside fp16's range


@pytest.mark.parametrize("name", list(ALL))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_shapes_round_trip(name: str, case: tuple) -> None:
    spec, chunk = case
    codec = ALL[name]
    out = roundtrip(codec, chunk, spec)
    if codec.lossless:
        assert torch.equal(out.view(torch.uint8), chunk.view(torch.uint8))
    else:
        assert_within_bound(codec, chunk, out)


@pytest.mark.parametrize("name", [n for n in ALL if n != "raw"])
@settings(max_examples=6, deadline=None)
@given(case=cases(), layers=st.integers(1, 4))
def test_random_spec_mismatch_is_a_layout_error(name: str, case: tuple, layers: int) -> None:
    spec, chunk = case
    payload, params = ALL[name].encode(chunk, spec)
    other = spec_for(spec.dtype, layers=layers + spec.num_layers, heads=spec.num_kv_heads, dim=spec.head_dim)
    with pytest.raises(LayoutError):
        ALL[name].decode(memoryview(bytes(payload)), params, other,
                         torch.empty(other.chunk_shape(chunk.shape[2]), dtype=chunk.dtype))


@pytest.mark.parametrize("name", list(LOSSY))
def test_fp16_values_near_its_limit_decode_finite(name: str) -> None:
    """Reconstructions within the error bound of values near fp16's max must not round to inf."""
    spec = spec_for("float16", layers=2, heads=1, dim=4, chunk=64)
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(spec.chunk_shape(33), generator=g) * 2 - 1) * 1e3
    x[..., 0] = torch.where(x[..., 0] > 0, 65000.0, -65000.0)
    chunk = x.to(torch.float16)
    out = roundtrip(LOSSY[name], chunk, spec)
    assert bool(torch.isfinite(out).all()), f"{name} decoded non-finite values"
    assert_within_bound(LOSSY[name], chunk, out)
