"""kvtier: a tiered KV-cache layer for LLM inference engines."""

from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, CorruptChunk, KvtierError, TierUnavailable
from kvtier.keys import Chunker, Namespace
from kvtier.layout import KVSpec

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
