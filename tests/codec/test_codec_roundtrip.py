"""Every codec round-trips every dtype: bit-exact for lossless codecs, within the documented bound for
lossy ones; partial chunks, non-contiguous destinations, zero rows and the registry."""

from __future__ import annotations

import pytest
import torch
from codec_support import ALL, DTYPES, LOSSLESS, LOSSY, assert_within_bound, kv_like, roundtrip, spec_for

from kvtier.codec.base import codec_names, get_codec
from kvtier.errors import ConfigError, LayoutError

# relative RMS error on kv_like data: 8-bit codecs ~1-3%, cachegen ~10%, 2-bit KIVI ~25-45%
REL_RMS = {"int8": 0.03, "fp8": 0.05, "cachegen": 0.2, "kivi": 0.5}


def test_registry_lists_every_builtin_codec() -> None:
    assert {"raw", "zstd", "lz4", "int8", "fp8", "kivi", "cachegen", "cachegen-ans"} <= set(codec_names())
    with pytest.raises(ConfigError, match="cachegen"):
        get_codec("cachegn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_is_bit_exact(name: str, dtype: str) -> None:
    spec = spec_for(dtype)
    chunk = kv_like(spec, 32, seed=1)
    chunk[0, 0, 3, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).to(chunk.dtype)
    out = roundtrip(LOSSLESS[name], chunk, spec)
    assert torch.equal(out.view(torch.uint8), chunk.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSY))
def test_lossy_error_is_within_the_documented_bound(name: str, dtype: str) -> None:
    spec = spec_for(dtype)
    chunk = kv_like(spec, 32, seed=2)
    codec = LOSSY[name]
    out = roundtrip(codec, chunk, spec)
    assert_within_bound(codec, chunk, out)
    # and the bound is a real constraint, not a vacuous one: errors are small relative to the data
    rel = (out.float() - chunk.float()).square().mean().sqrt() / chunk.float().square().mean().sqrt()
    assert float(rel) < REL_RMS[name.split("-")[0]]


@pytest.mark.parametrize("tokens", [1, 2, 17])
@pytest.mark.parametrize("name", list(ALL))
def test_partial_chunks_and_strided_destinations(name: str, tokens: int) -> None:
    spec = spec_for("bfloat16")
    chunk = kv_like(spec, tokens, seed=tokens)
    big = torch.zeros(spec.chunk_shape(40), dtype=chunk.dtype)
    out = big[:, :, 5 : 5 + tokens]  # a non-contiguous view, as the CPU arena hands out
    roundtrip(ALL[name], chunk, spec, out=out)
    assert torch.count_nonzero(big[:, :, :5]) == 0 and torch.count_nonzero(big[:, :, 5 + tokens :]) == 0
    if ALL[name].lossless:
        assert torch.equal(out, chunk)
    else:
        assert_within_bound(ALL[name], chunk, out)


@pytest.mark.parametrize("name", list(LOSSY))
def test_zero_and_constant_rows(name: str) -> None:
    spec = spec_for("bfloat16")
    chunk = kv_like(spec, 24, seed=3)
    chunk[1] = 0  # a whole layer of zeros
    chunk[0, :, 5] = 0  # an all-zero token row (NaN in the reference CacheGen)
    chunk[2, 1, :, 1] = 0.5  # constant channel group
    out = roundtrip(LOSSY[name], chunk, spec)
    assert torch.isfinite(out.float()).all()
    assert_within_bound(LOSSY[name], chunk, out)
    assert torch.equal(roundtrip(LOSSY[name], torch.zeros_like(chunk), spec), torch.zeros_like(chunk))


@pytest.mark.parametrize("name", list(LOSSY))
def test_lossy_codecs_reject_non_finite_input(name: str) -> None:
    spec = spec_for("float32")
    chunk = kv_like(spec, 8)
    chunk[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(LayoutError, match="finite"):
        LOSSY[name].encode(chunk, spec)


def test_cachegen_anchor_tokens_are_exact() -> None:
    spec = spec_for("bfloat16")
    chunk = kv_like(spec, 32, seed=4)
    codec = ALL["cachegen-g4-groups"]
    out = roundtrip(codec, chunk, spec)
    assert torch.equal(out[:, :, ::4], chunk[:, :, ::4])


def test_cachegen_is_smaller_than_fp8_on_kv_like_data() -> None:
    spec = spec_for("bfloat16", layers=4, heads=2, dim=32, chunk=128)
    chunk = kv_like(spec, 128, seed=5)
    sizes = {n: len(bytes(ALL[n].encode(chunk, spec)[0])) for n in ("fp8", "cachegen", "cachegen-ans")}
    assert sizes["cachegen-ans"] < sizes["cachegen"] < sizes["fp8"]


@pytest.mark.parametrize("name", ["cachegen", "cachegen-ans"])
def test_cachegen_wide_symbols_and_step_growth(name: str) -> None:
    """One huge outlier forces |q| beyond a byte (zstd path: 16-bit symbols) and the step to grow."""
    spec = spec_for("float32")
    chunk = kv_like(spec, 32, seed=6)
    chunk[1, 0, 7, 1, 3] = 5e4
    out = roundtrip(LOSSY[name], chunk, spec)
    assert_within_bound(LOSSY[name], chunk, out)
    step = LOSSY[name].error_bound(chunk)[1, 0, 7, 1, 3] * 2  # type: ignore[attr-defined]
    assert float(step) >= 4e4 / 2047  # grown so that at most 4095 bins cover the plane


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_codecs_copy_on_the_calling_thread(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encode and decode (into a contiguous chunk and into a slot view of fewer tokens) never call
    torch's ``copy_``, which spreads a copy over every intra-op thread: decoding runs beside reads in
    flight and encoding beside the write-back's I/O, where a multi-threaded copy waits for the busy
    core."""
    spec = spec_for("bfloat16")
    chunk = kv_like(spec, 32, seed=4)
    slot = torch.full(spec.chunk_shape(64), 7, dtype=chunk.dtype)
    calls: list[tuple[int, ...]] = []
    real = torch.Tensor.copy_

    def counted(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        calls.append(tuple(self.shape))
        return real(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counted)
    for out in (torch.full_like(chunk, 7), slot[:, :, :32]):
        assert torch.equal(roundtrip(LOSSLESS[name], chunk, spec, out), chunk)
    assert calls == []
