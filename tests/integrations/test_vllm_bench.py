"""``kvtier bench vllm``'s pure parts (no vLLM needed): interleaving order, per-pair ratios, the
inter-token-gap window, and the async-itl configuration (a CPU tier that holds one document only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kvtier.bench.common import Report
from kvtier.bench.vllm import (
    Stream,
    async_itl_report,
    itl_configs,
    itl_stats,
    load_spans,
    loading_stats,
    long_doc_report,
    pair_ratios,
    parse_nices,
    rotated,
    ttft_configs,
)
from kvtier.cli import app
from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.integrations.vllm.transfer import LOAD_SPAN_LOG


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


def _rows(report: Report) -> dict[tuple[str, str], dict]:
    return {(r["series"], r["label"]): r for r in report.record()["rows"]}


def test_long_doc_rows_compare_kvtier_with_the_prefix_cache_per_document() -> None:
    results = {"vllm+prefix": {"warmup_ttft_s": [8.0, 8.0], "query_ttft_s": [0.4, 0.5]},
               "kvtier": {"warmup_ttft_s": [3.0, 3.0], "query_ttft_s": [0.2, 1.0]},
               "kvtier+layerwise": {"warmup_ttft_s": [3.3, 3.0], "query_ttft_s": [0.4, 1.0]}}
    report = Report("t", "t", unit="s", goal=1 / 1.1)
    long_doc_report(results, report)
    rows = _rows(report)
    kv = rows[("kvtier", "query TTFT")]
    assert kv["vs"] == "vllm+prefix: query TTFT"
    assert kv["ratio"] == {"min": 0.5, "median": 1.25, "max": 2.0}  # prefix ÷ kvtier, document by document
    assert kv["meets_goal"] is True
    assert "vs" not in rows[("kvtier", "warm-up TTFT")]
    assert report.meta["layerwise_vs_whole"]["query_ttft"]["pairs"] == [2.0, 1.0]


def test_itl_rows_compare_each_repeat_with_the_same_users_alone() -> None:
    def run(p50: float) -> dict:
        itl = {"p50": p50, "p90": 2 * p50, "max": 4 * p50}
        return {"itl": itl, "itl_until_first_token": {"p50": 3 * p50}, "load_s": 0.5, "fourth_ttft_s": 1.0}

    results = {"kvtier-sync": {"alone": [run(0.05), run(0.04)], "loading": [run(0.1), run(0.04)],
                               "cpu_loading": [run(0.08), run(0.02)]}}
    report = Report("t", "t", unit="s", goal=1 / 1.2)
    async_itl_report(results, report)
    rows = _rows(report)
    row = rows[("kvtier-sync", "ITL p50 during load")]
    assert row["vs"] == "kvtier-sync: ITL p50 alone" and row["ratio"]["min"] == 0.5 and row["ratio"]["max"] == 1.0
    until = rows[("kvtier-sync", "ITL p50 until 4th's first token")]
    assert until["vs"] == "kvtier-sync: ITL p50 alone" and until["ratio"]["max"] == pytest.approx(1 / 3)
    # the disk load against the same arrival whose KV comes from the CPU tier, same window
    cpu = rows[("kvtier-sync", "ITL p50 during CPU-tier load")]
    assert cpu["vs"] == "kvtier-sync: ITL p50 alone"
    assert (cpu["ratio"]["min"], cpu["ratio"]["max"]) == pytest.approx((0.625, 2.0))
    disk = rows[("kvtier-sync", "ITL p50 during load vs CPU-tier load")]
    assert disk["vs"] == "kvtier-sync: ITL p50 during CPU-tier load"
    assert (disk["ratio"]["min"], disk["ratio"]["max"]) == pytest.approx((0.5, 0.8))
    until_cpu = rows[("kvtier-sync", "ITL p50 until 4th's first token vs CPU tier")]
    assert until_cpu["vs"] == "kvtier-sync: ITL p50 until 4th's first token (CPU tier)"


def test_the_load_window_is_the_connectors_logged_span() -> None:
    """Only the gaps overlapping the load the connector logged count as "during the load" (not the
    fourth's own prefill after it); the window until the fourth's first token is kept apart."""
    log = "\n".join(["INFO other line",
                     "DEBUG " + LOAD_SPAN_LOG % ("cmpl-1", "async", 4096, 4096, 5.0, 6.0),  # an earlier repeat
                     "DEBUG " + LOAD_SPAN_LOG % ("cmpl-2", "async", 4096, 4096, 10.2, 10.6)])
    spans = load_spans(log)
    assert spans == [(5.0, 6.0), (10.2, 10.6)]
    decoder = Stream(sent=9.0, stamps=[9.5, 10.0, 10.1, 10.3, 10.5, 10.7, 11.5, 11.6], text="", usage={})
    fourth = Stream(sent=10.05, stamps=[11.4], text="", usage={"prompt_tokens": 4100})
    stats = loading_stats([decoder], fourth, spans)
    assert stats["itl"]["count"] == 3  # 10.1-10.3, 10.3-10.5, 10.5-10.7 (10.0-10.1 ends before the load)
    assert stats["load_s"] == pytest.approx(0.4) and stats["fourth_ttft_s"] == pytest.approx(1.35)
    assert stats["itl_until_first_token"]["max"] == pytest.approx(0.8)  # the fourth's prefill step
    assert stats["itl"]["max"] == pytest.approx(0.2)
    assert stats["window_gaps_s"] == pytest.approx([0.2, 0.2, 0.2])
    assert stats["span_after_sent_s"] == pytest.approx(0.15)
    with pytest.raises(RuntimeError, match="one load"):
        loading_stats([decoder], fourth, [])


def test_load_nice_adds_async_configurations(tmp_path: Path) -> None:
    configs = itl_configs(tmp_path, 128, 2040, parse_nices("19, 5"))
    assert [(c.name, c.load_async, c.load_nice) for c in configs] == [
        ("kvtier-sync", False, None), ("kvtier-async", True, None),
        ("kvtier-async-nice19", True, 19), ("kvtier-async-nice5", True, 5)]
    assert len({c.overrides["disk"]["path"] for c in configs}) == 4  # a disk directory each
    for bad in ("x", "20"):
        with pytest.raises((typer.BadParameter, ConfigError)):
            parse_nices(bad)
