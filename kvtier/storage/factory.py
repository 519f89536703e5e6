"""Build the lower tiers named in the config, in order: disk, remote server, Redis, shared fs."""

from __future__ import annotations

from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier.layout import KVSpec
from kvtier.storage.base import Tier


def build_tiers(config: KvtierConfig, spec: KVSpec) -> list[tuple[Tier, str]]:
    """Return ``(tier, codec)`` pairs for every enabled tier below CPU."""
    tiers: list[tuple[Tier, str]] = []
    for section in ("disk", "remote", "redis", "fs"):
        if getattr(config, section).enabled:
            raise ConfigError(f"tier {section!r} is enabled but not available in this build")
    return tiers
