"""Shared fixtures. The embedded model is converted once per machine (cached under the user's cache
dir) and loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from kvtier.models import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture
def small_spec():
    from kvtier.layout import KVSpec

    return KVSpec(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
