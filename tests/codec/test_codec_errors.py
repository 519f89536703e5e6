"""Damaged payloads raise CorruptChunk; a payload decoded for another KV spec raises LayoutError."""

from __future__ import annotations

import pytest
import torch
from codec_support import ALL, kv_like, spec_for

from kvtier.errors import CorruptChunk, LayoutError

NAMES = [n for n in ALL if n != "raw"] + ["raw"]


def encoded(name: str) -> tuple[bytes, dict, torch.Tensor]:
    spec = spec_for("bfloat16")
    chunk = kv_like(spec, 20, seed=9)
    payload, params = ALL[name].encode(chunk, spec)
    return bytes(payload), params, chunk


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("damage", ["truncate", "extend", "empty", "garbage"])
def test_damaged_payload_raises_corrupt_chunk(name: str, damage: str) -> None:
    payload, params, chunk = encoded(name)
    bad = {
        "truncate": payload[:-3],
        "extend": payload + b"\x00\x01\x02",
        "empty": b"",
        "garbage": bytes(torch.randint(0, 256, (len(payload),), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8).tolist()),
    }[damage]
    if name == "raw" and damage == "garbage":
        pytest.skip("raw bytes of the right length are indistinguishable from KV: the wire checksum's job")
    with pytest.raises(CorruptChunk):
        ALL[name].decode(memoryview(bad), params, spec_for("bfloat16"), torch.empty_like(chunk))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "raw"])
def test_bad_params_raise_corrupt_chunk(name: str) -> None:
    payload, params, chunk = encoded(name)
    for broken in ({k: v for k, v in params.items() if k != "T"}, {**params, "T": "20"}, {**params, "L": True}):
        with pytest.raises(CorruptChunk):
            ALL[name].decode(memoryview(payload), broken, spec_for("bfloat16"), torch.empty_like(chunk))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "raw"])
@pytest.mark.parametrize("other", [dict(layers=4), dict(heads=1), dict(dim=16), dict(dtype="float16")])
def test_other_kv_spec_raises_layout_error(name: str, other: dict) -> None:
    payload, params, _chunk = encoded(name)
    spec = spec_for(**{"dtype": "bfloat16", **other})
    with pytest.raises(LayoutError, match=r"spec|destination"):
        ALL[name].decode(memoryview(payload), params, spec, torch.empty(spec.chunk_shape(20), dtype=spec.torch_dtype))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_token_count_or_dtype_of_destination_raises_layout_error(name: str) -> None:
    payload, params, _chunk = encoded(name)
    spec = spec_for("bfloat16")
    with pytest.raises((LayoutError, CorruptChunk)):
        ALL[name].decode(memoryview(payload), params, spec, torch.empty(spec.chunk_shape(19), dtype=torch.bfloat16))
    if name != "raw":
        with pytest.raises(LayoutError):
            ALL[name].decode(memoryview(payload), params, spec, torch.empty(spec.chunk_shape(20)))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "raw"])
def test_encoding_a_chunk_of_another_spec_raises_layout_error(name: str) -> None:
    spec = spec_for("bfloat16")
    with pytest.raises(LayoutError):
        ALL[name].encode(torch.zeros(spec_for("bfloat16", heads=3).chunk_shape(4), dtype=torch.bfloat16), spec)
