"""The benchmark report: paired ratios, goals, JSON + PNG + table (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.bench.common import Report, interleaved, paired


def test_paired_ratio_is_baseline_over_ours_per_run() -> None:
    # ours took 1 s, 2 s, 4 s; the baseline 2 s each time -> 2x, 1x, 0.5x
    assert paired([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]) == {"min": 0.5, "median": 1.0, "max": 2.0}
    with pytest.raises(ValueError, match="as many runs"):
        paired([1.0], [1.0, 2.0])


def test_report_rates_ratios_goal_and_files(tmp_path: Path) -> None:
    report = Report("bench_x", "two ops vs a ceiling", amount=2.0, goal=0.8, meta={"tokens": 8})
    ceiling = report.add("read", [1.0, 1.0, 1.0], series="raw")
    report.add("read", [1.0, 2.0, 1.25], series="engine", vs=ceiling, hit=True)
    slow = report.add("write", [4.0, 4.0, 4.0], series="raw")
    report.add("write", [8.0, 8.0, 8.0], series="engine", vs=slow)
    record = report.finish(tmp_path, show=False)

    on_disk = json.loads((tmp_path / "bench_x.json").read_text())
    assert on_disk["benchmark"] == "bench_x" and on_disk["tokens"] == 8 and "machine" in on_disk
    assert (tmp_path / "bench_x.png").stat().st_size > 1000
    rows = {(r["series"], r["label"]): r for r in record["rows"]}
    assert rows[("raw", "read")]["GB/s"] == {"min": 2.0, "median": 2.0, "max": 2.0}  # 2 GB per run
    engine_read = rows[("engine", "read")]
    assert engine_read["GB/s"] == {"min": 1.0, "median": 1.6, "max": 2.0}
    assert engine_read["ratio"] == {"min": 0.5, "median": 0.8, "max": 1.0}
    assert engine_read["vs"] == "raw: read" and engine_read["meets_goal"] is True and engine_read["hit"] is True
    assert rows[("engine", "write")]["meets_goal"] is False  # 0.5x of its ceiling
    assert "ratio" not in rows[("raw", "write")]


def test_report_table_shows_every_row_and_escapes_labels() -> None:
    from rich.console import Console

    report = Report("bench_y", "latency", unit="ms")
    base = report.add("hash only", [0.001, 0.002])
    report.add("lookup[array]", [0.002, 0.002], vs=base)
    console = Console(record=True, width=200)
    console.print(report.table())
    text = console.export_text()
    assert "lookup[array]" in text and "hash only" in text  # "[array]" is not taken for markup
    assert "0.75x" in text  # median of 0.5x and 1.0x


def test_report_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="needs an amount"):
        Report("z", "z", unit="GB/s")
    report = Report("z", "z", unit="s")
    base = report.add("a", [1.0, 1.0])
    with pytest.raises(ValueError, match="has 1 runs"):
        report.add("b", [1.0], vs=base)
    with pytest.raises(ValueError, match="no runs"):
        report.add("c", [])


def test_interleaved_reverses_the_order_and_drops_warmup() -> None:
    calls: list[str] = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=2,
                        prepare={"b": lambda: calls.append("prep-b")})
    assert calls == ["a", "prep-b", "b", "prep-b", "b", "a", "a", "prep-b", "b"]
    assert [len(t) for t in times.values()] == [2, 2]
