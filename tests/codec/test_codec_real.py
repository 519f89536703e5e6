"""Slow: cachegen on real SmolLM2 KV over the shipped document: ratio and quality goals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_cachegen_on_real_kv_meets_ratio_and_quality(model_dir: Path) -> None:
    from kvtier.bench.codecs import load_workload, measure_codec, score

    torch.manual_seed(0)
    work = load_workload(context_tokens=1024, continuation=192, questions=0)
    assert work.kv.shape[2] == 1024 and work.kv.dtype == torch.bfloat16
    base = score(work, work.kv)
    row, decoded = measure_codec(work, "cachegen", repeat=1)
    got = score(work, decoded)
    assert row["ratio"] >= 3.5, row
    increase = math.exp(got["nll"] - base["nll"]) - 1
    top1 = float((got["argmax"] == base["argmax"]).float().mean())
    assert increase <= 0.02, f"perplexity +{100 * increase:.2f}%"
    assert top1 >= 0.9, f"top-1 agreement {top1:.3f}"
    # the first token (attention sink) is an anchor: stored exactly
    assert torch.equal(decoded[:, :, 0], work.kv[:, :, 0])
