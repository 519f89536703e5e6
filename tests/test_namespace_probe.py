"""Namespace probe: an engine whose namespace differs from the one that filled a shared tier reports a
counted, logged namespace miss (real DiskTier directories, real engines one after the other)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import as_token_array
from kvtier.layout import KVSpec
from kvtier.namespace_probe import PROBE_TOKENS, probe_key
from kvtier.storage.disk import DiskTier, chunk_path

TOKENS = list(range(7000, 7000 + PROBE_TOKENS + 40))


def spec(dtype: str = "float32", chunk: int = 32) -> KVSpec:
    return KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype, chunk_tokens=chunk)


def engine(root: Path, model: str = "org/model", *, dtype: str = "float32", chunk: int = 32,
           tenant: str = "") -> CacheEngine:
    cfg = load_config(environ={}, overrides={"chunk_tokens": chunk, "tenant": tenant, "cpu": {"capacity": "8MiB"}})
    return CacheEngine(spec(dtype, chunk), model, cfg, tiers=[(DiskTier(root, 1 << 30), "raw")])


def fill(root: Path, tokens: list[int] = TOKENS, **kw: object) -> None:
    s = spec(str(kw.get("dtype", "float32")), int(kw.get("chunk", 32)))  # type: ignore[call-overload]
    with engine(root, **kw) as e:  # type: ignore[arg-type]
        assert e.store(tokens, torch.zeros(s.chunk_shape(len(tokens)), dtype=s.torch_dtype)) == len(tokens)
        assert e.probe.flush(10) and e.storage.flush(10)


@pytest.mark.parametrize(("kw", "field"), [({"model": "org/other"}, "model"), ({"chunk": 64}, "spec"),
                                          ({"dtype": "bfloat16"}, "spec"), ({"tenant": "t2"}, "tenant")])
def test_mismatch_is_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        kw: dict[str, object], field: str) -> None:
    fill(tmp_path)
    caplog.set_level(logging.WARNING, logger="kvtier.namespace_probe")
    with engine(tmp_path, **kw) as other:  # type: ignore[arg-type]
        assert other.lookup(TOKENS) == 0
        assert other.lookup(TOKENS) == 0
        assert other.stats()["engine"]["namespace_misses"] == 2
    warnings = [r.getMessage() for r in caplog.records if "namespace miss" in r.getMessage()]
    assert len(warnings) == 1 and f"'{field}'" in warnings[0]  # logged once per foreign namespace


def test_same_namespace_hits_without_namespace_miss(tmp_path: Path) -> None:
    fill(tmp_path)
    with engine(tmp_path) as same:
        assert same.lookup(TOKENS) == len(TOKENS)
        assert same.lookup([1, 2, 3, *TOKENS]) == 0  # a plain miss: nobody stored these first tokens
        assert same.stats()["engine"].get("namespace_misses", 0) == 0


def test_short_prompts_write_no_marker(tmp_path: Path) -> None:
    short = TOKENS[: PROBE_TOKENS - 1]
    fill(tmp_path, short)
    with engine(tmp_path, "org/other") as other:
        assert other.lookup(short) == 0
        assert other.stats()["engine"]["namespace_misses"] == 0
        assert other.stats()["engine"]["namespace_markers"] == 0


def test_damaged_marker_is_ignored(tmp_path: Path) -> None:
    fill(tmp_path)
    path = chunk_path(tmp_path, probe_key(as_token_array(TOKENS)))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with engine(tmp_path, "org/other") as other:
        assert other.lookup(TOKENS) == 0  # nothing raised, nothing reported
        assert other.stats()["engine"]["namespace_misses"] == 0
