"""End to end: a CacheEngine whose disk tier stores chunks with a codec (cachegen, zstd)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from codec_support import LOSSY, assert_within_bound, kv_like

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.layout import KVSpec

disk = pytest.importorskip("kvtier.storage.disk")

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=16, dtype="bfloat16", chunk_tokens=32)
TOKENS = list(range(1000, 1160))  # 5 full chunks


@pytest.mark.parametrize("codec", ["cachegen", "zstd"])
def test_disk_tier_with_codec(tmp_path: Path, codec: str) -> None:
    cfg = load_config(environ={}, overrides={"chunk_tokens": 32, "cpu": {"capacity": 16 * SPEC.chunk_bytes}})
    kv = kv_like(SPEC, len(TOKENS), seed=3)
    with CacheEngine(SPEC, "m", cfg, tiers=[(disk.DiskTier(tmp_path / "d", 1 << 30), codec)]) as engine:
        assert engine.store(TOKENS, kv) == len(TOKENS)
        assert engine.storage.flush(30)
        on_disk = sum(p.stat().st_size for p in (tmp_path / "d").rglob("*.kvt"))
        engine.cpu.clear()
        out = torch.zeros_like(kv)
        assert engine.retrieve(TOKENS, out) == len(TOKENS)
        assert engine.stats()["disk"]["hits"] == 5
    if codec == "zstd":
        assert torch.equal(out, kv)
    else:
        assert on_disk < kv.numel() * 2 / 3
        for start in range(0, len(TOKENS), 32):
            assert_within_bound(LOSSY[codec], kv[:, :, start : start + 32], out[:, :, start : start + 32])
