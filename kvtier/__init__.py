"""kvtier: a tiered KV-cache layer for LLM inference engines."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.config import KvtierConfig, load_config
    from kvtier.engine import CacheEngine
    from kvtier.errors import ConfigError, CorruptChunk, KvtierError, TierUnavailable
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec

# Lazy re-exports (PEP 562): importing a light submodule (kvtier.config, kvtier.server.app) must not
# pull in torch through kvtier.engine; the names below are imported on first attribute access.
_EXPORTS = {
    "CacheEngine": "kvtier.engine",
    "Chunker": "kvtier.keys",
    "ConfigError": "kvtier.errors",
    "CorruptChunk": "kvtier.errors",
    "KVSpec": "kvtier.layout",
    "KvtierConfig": "kvtier.config",
    "KvtierError": "kvtier.errors",
    "Namespace": "kvtier.keys",
    "TierUnavailable": "kvtier.errors",
    "load_config": "kvtier.config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CacheEngine",
    "Chunker",
    "ConfigError",
    "CorruptChunk",
    "KVSpec",
    "KvtierConfig",
    "KvtierError",
    "Namespace",
    "TierUnavailable",
    "load_config",
]
__version__ = "0.1.0"
