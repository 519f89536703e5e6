"""``kvtier demo`` end to end on a short context: answers identical with and without kvtier, and later
questions hit the cached document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_demo_short(model_dir: Path, tmp_path: Path) -> None:
    from kvtier.demo import run_demo

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than two threads on a shared 2-core machine
    try:
        run_demo(context_tokens=600, questions=2, max_new_tokens=4, out_dir=tmp_path, progress=False,
                 model_dir=model_dir, disk_dir=tmp_path / "disk")
    finally:
        torch.set_num_threads(before)
    record = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert record["passed"] is True
    prefix = 600 // record["chunk_tokens"] * record["chunk_tokens"]
    assert record["context_tokens"] == prefix
    rows = record["questions"]
    assert len(rows) == 3 and all(r["identical"] for r in rows)
    assert [r["source"] for r in rows] == ["cpu", "cpu", "disk after restart"]
    assert rows[2]["hit_tokens"] >= prefix  # a fresh engine finds the prompt (asked before) on disk
    # the restart row asks question 1 again: compared with question 1's no-cache answer, not recomputed
    assert rows[2]["nocache_reused"] and not rows[0]["nocache_reused"]
    assert rows[2]["ttft_nocache_s"] == rows[0]["ttft_nocache_s"]
    assert rows[2]["answer_nocache"] == rows[0]["answer_nocache"] == rows[2]["answer_kvtier"]
    assert rows[0]["hit_tokens"] == 0  # the first question fills the cache
    assert rows[1]["hit_tokens"] == prefix > 0  # the second reuses the whole document prefix
    assert record["kvtier_stats"]["final"]["engine"]["promoted_chunks"] >= prefix // record["chunk_tokens"]


@pytest.mark.parametrize(("flags", "expected", "why"), [
    ({"avx2", "avx512f"}, "float32", "lacks native bf16"),
    (set(), "float32", "lacks native bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "float32", "dot products only (avx512_bf16)"),
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, "bfloat16", "matrix unit (amx_bf16)"),
])
def test_auto_dtype_follows_native_bf16(flags: set[str], expected: str, why: str) -> None:
    from kvtier.demo import choose_dtype

    dtype, reason = choose_dtype("auto", flags)
    assert dtype == expected and why in reason


def test_explicit_dtype_overrides_detection() -> None:
    from kvtier.demo import choose_dtype

    assert choose_dtype("bfloat16", {"avx2"}) == ("bfloat16", "set by --dtype")
    assert choose_dtype("float32", {"avx512_bf16"}) == ("float32", "set by --dtype")


def test_cpu_flags_reads_this_machine() -> None:
    from kvtier.demo import cpu_flags

    flags = cpu_flags()
    if Path("/proc/cpuinfo").exists():
        assert flags  # every Linux CPU lists at least one flag (x86 "flags", arm "Features")


def test_table_has_one_line_per_answer() -> None:
    from rich.console import Console

    from kvtier.demo import answer_table

    long_answer = "The answer is " + "very " * 60 + "long.\nSecond line.\nThird line."
    row = {"source": "cpu", "ttft_nocache_s": 3.1, "ttft_kvtier_s": 0.2, "hit_tokens": 3072, "speedup": 15.5,
           "answer_kvtier": long_answer, "identical": True}
    record = {"context_tokens": 3072, "dtype": "float32", "questions": [row, dict(row, source="disk after restart")]}
    console = Console(width=100, record=True, color_system=None)
    console.print(answer_table(record, 80))
    lines = console.export_text().splitlines()
    body = [line for line in lines if "3.10" in line]
    assert len(body) == 2, lines  # each question is one row of one line
    assert len(lines) <= 9, lines  # title, caption, borders, header, 2 rows: nothing wraps
    assert max(len(line) for line in lines) <= 80
    assert "…" in body[0] and "Second line" not in console.export_text()
