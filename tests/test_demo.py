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
    assert rows[0]["hit_tokens"] == 0  # the first question fills the cache
    assert rows[1]["hit_tokens"] == prefix > 0  # the second reuses the whole document prefix
    assert record["kvtier_stats"]["final"]["engine"]["promoted_chunks"] >= prefix // record["chunk_tokens"]
