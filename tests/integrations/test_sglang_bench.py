"""``kvtier bench sglang storage`` end to end on a small batch (no SGLang needed; timings not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import kvtier
from kvtier.cli import app


def test_storage_bench_writes_rows_ratios_and_a_plot(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "sglang", "storage", "--pages", "8", "--repeat", "3",
                                      "--disk-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "sglang_storage.json").read_text())
    rows = data["rows"]
    assert set(rows) == {f"{sync}, {kind}" for sync in ("no fsync", "fsync")
                         for kind in ("1 page per object", "multi-page objects")}
    assert rows["fsync, 1 page per object"]["objects"] == 8
    assert rows["fsync, multi-page objects"]["objects"] == 1  # auto: up to 32 pages of 360 KiB in one object
    for row in rows.values():
        for op in ("write", "read"):
            assert len(row[op]["runs_s"]) == 3 and row[op]["GBps"]["min"] <= row[op]["GBps"]["max"]
            assert 0 < row[op]["vs_copy"]["min"] <= row[op]["vs_copy"]["median"] <= row[op]["vs_copy"]["max"]
            assert 0 < row[op]["vs_pool_copy"]["min"] <= row[op]["vs_pool_copy"]["max"]
    assert {"write", "read"} == set(data["multi-page ÷ 1 page (fsync)"])
    assert len(data["ceiling copy_ (no fsync)"]["runs_s"]) == 3
    assert len(data["ceiling pool copy (fsync)"]["read"]["runs_s"]) == 3
    assert (tmp_path / "out" / "sglang_storage.png").stat().st_size > 0
    assert not list(tmp_path.glob("kvtier-sglang-bench-*"))  # the disk tier's scratch directory is gone


def test_a_baseline_checkout_runs_in_a_child_interleaved_with_ours(tmp_path: Path) -> None:
    """``--baseline NAME=DIR``: here DIR is this checkout itself (the child imports kvtier from it)."""
    tree = Path(kvtier.__file__).parents[1]
    result = CliRunner().invoke(app, ["bench", "sglang", "storage", "--pages", "8", "--repeat", "3",
                                      "--baseline", f"self={tree}", "--disk-dir", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "sglang_storage.json").read_text())
    for sync in ("no fsync", "fsync"):
        row = data["baselines"][f"{sync}, self"]
        for op in ("write", "read"):
            assert len(row[op]["runs_s"]) == 3 and all(t > 0 for t in row[op]["runs_s"])
            assert data[f"multi-page ÷ self ({sync})"][op]["min"] > 0
    assert "multi-page ÷ self: write" in result.output and "pool scatter" in result.output
    assert not list(tmp_path.glob("kvtier-sglang-bench-*"))


def test_a_baseline_must_be_name_equals_a_kvtier_checkout(tmp_path: Path) -> None:
    bad = CliRunner().invoke(app, ["bench", "sglang", "storage", "--baseline", str(tmp_path)])
    assert bad.exit_code != 0 and "NAME=DIR" in str(bad.exception)
    missing = CliRunner().invoke(app, ["bench", "sglang", "storage", "--pages", "8", "--repeat", "3",
                                       "--baseline", f"old={tmp_path}", "--disk-dir", str(tmp_path)])
    assert missing.exit_code != 0 and "no kvtier/integrations there" in str(missing.exception)


def test_unknown_part_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["bench", "sglang", "latency"])
    assert result.exit_code != 0 and "'storage' or 'ttft'" in str(result.exception)
