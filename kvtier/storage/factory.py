"""Build the lower tiers named in the config, in order: disk, remote server, Redis, shared fs, Mooncake."""

from __future__ import annotations

from kvtier.codec.base import get_codec
from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier.layout import KVSpec
from kvtier.storage.base import Tier


def build_tiers(config: KvtierConfig, spec: KVSpec) -> list[tuple[Tier, str]]:
    """Return ``(tier, codec)`` pairs for every enabled tier below CPU (tiers already opened are closed
    again if a later one fails)."""
    tiers: list[tuple[Tier, str]] = []
    try:
        _build(config, tiers)
    except BaseException:
        for tier, _codec in tiers:
            tier.close()
        raise
    return tiers


def _build(config: KvtierConfig, tiers: list[tuple[Tier, str]]) -> None:
    """Append the enabled tiers in order; one branch per config section."""
    for section in ("disk", "remote", "redis", "fs", "mooncake"):
        if getattr(config, section).enabled:
            get_codec(getattr(config, section).codec)  # unknown codec -> ConfigError at start
    if config.disk.enabled:
        from kvtier.storage.disk import DiskTier

        d = config.disk
        tiers.append((DiskTier(d.path, d.capacity, d.policy, d.fsync), d.codec))
    if config.remote.enabled:
        from kvtier.storage.remote import RemoteTier

        tiers.append((RemoteTier.from_config(config.remote), config.remote.codec))
    if config.redis.enabled:
        from kvtier.storage.redis import RedisTier

        tiers.append((RedisTier.from_config(config.redis), config.redis.codec))
    if config.fs.enabled:
        from kvtier.storage.fs import FsTier

        if not config.fs.path:
            raise ConfigError("fs.path must name the shared directory when fs.enabled is true")
        tiers.append((FsTier(config.fs.path, fsync=config.fs.fsync), config.fs.codec))
    if config.mooncake.enabled:
        from kvtier.storage.mooncake import MooncakeTier

        tiers.append((MooncakeTier.from_config(config.mooncake), config.mooncake.codec))
