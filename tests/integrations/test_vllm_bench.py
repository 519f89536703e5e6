"""``kvtier bench vllm``'s pure parts (no vLLM needed): interleaving order, per-pair ratios, the
inter-token-gap window, and the async-itl configuration (a CPU tier that holds one document only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kvtier.bench.vllm import Stream, itl_configs, itl_stats, pair_ratios, rotated, ttft_configs
from kvtier.cli import app
from kvtier.config import load_config


def test_every_configuration_goes_first_in_turn() -> None:
    names = ["vllm", "vllm+prefix", "kvtier"]
    orders = [rotated(names, i) for i in range(3)]
    assert [o[0] for o in orders] == names
    assert all(sorted(o) == sorted(names) for o in orders)


def test_pair_ratios_are_per_prompt() -> None:
    r = pair_ratios([1.0, 3.0, 2.0], [2.0, 1.0, 2.0])
    assert r["pairs"] == [0.5, 3.0, 1.0]
    assert (r["min"], r["median"], r["max"]) == (0.5, 1.0, 3.0)


def test_stream_gaps_and_itl_stats() -> None:
    s = Stream(sent=10.0, stamps=[10.5, 10.6, 10.8, 11.8], text="abcd", usage={})
    assert s.ttft == pytest.approx(0.5)
    assert [round(b - a, 6) for a, b in s.gaps()] == [0.1, 0.2, 1.0]
    assert [round(b - a, 6) for a, b in s.gaps(skip=2)] == [1.0]
    stats = itl_stats([0.1, 0.2, 1.0])
    assert stats["p50"] == 0.2 and stats["max"] == 1.0 and stats["count"] == 3


def test_itl_configs_keep_one_document_in_cpu(tmp_path: Path) -> None:
    doc_words = 2000  # ≈4K tokens
    doc_bytes = 2 * doc_words * 46080
    configs = itl_configs(tmp_path, 128, doc_words)
    assert [c.load_async for c in configs] == [False, True]
    for c in configs:
        config = load_config(None, overrides=c.overrides)  # valid kvtier overrides
        assert config.disk.enabled and Path(config.disk.path).parent == tmp_path
        assert doc_bytes <= config.cpu.capacity < 2 * doc_bytes  # one document in CPU, never two


def test_unknown_configuration_is_named() -> None:
    with pytest.raises(typer.BadParameter, match="kvtier-fast"):
        ttft_configs(["kvtier", "kvtier-fast"], 128, "1GiB")


def test_registered_under_kvtier_bench() -> None:
    result = CliRunner().invoke(app, ["bench", "vllm", "--help"])
    assert result.exit_code == 0, result.output
    assert "async-itl" in result.output and "--layerwise" in result.output
