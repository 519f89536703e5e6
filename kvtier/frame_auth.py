"""Keys that authenticate chunk frames (see :mod:`kvtier.wire`): one keyring per tenant.

A frame written with a keyring carries ``key_id`` and ``MAC = BLAKE3-keyed(key, header-before-MAC ||
metadata || payload)`` (32 bytes). Keys are derived from the tenant's secret, never used raw:

    key    = BLAKE3-derive_key("kvtier 2026-12 chunk frame MAC v1", secret)
    key_id = BLAKE3-derive_key("kvtier 2026-12 chunk frame key id v1", secret)[:4] as uint32-le, | 1

Invariants: writes always use the current key; reads accept a frame only if its ``key_id`` names a
key of the ring (current or kept previous) and the MAC under that key matches. Different secrets give
different keys, so a frame of another tenant (or a forger without the secret) fails the MAC. Torch-free.

Why BLAKE3 keyed mode and not HMAC-SHA256: measured by ``kvtier bench auth`` (results/bench_auth.json)
on 256-token SmolLM2 bf16 chunks (5.9 MB): BLAKE3 keyed 3-6.5 GB/s on one core, HMAC-SHA256 ~1 GB/s
(shared 2-core machine); the MAC covers every payload byte on the store and load paths.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.config import AuthConfig

log = logging.getLogger(__name__)

MAC_BYTES = 32
_MAC_CONTEXT = "kvtier 2026-12 chunk frame MAC v1"
_ID_CONTEXT = "kvtier 2026-12 chunk frame key id v1"
MIN_SECRET_BYTES = 16


def _derive(secret: bytes) -> tuple[int, bytes]:
    key = blake3.blake3(secret, derive_key_context=_MAC_CONTEXT).digest()
    key_id = int.from_bytes(blake3.blake3(secret, derive_key_context=_ID_CONTEXT).digest(length=4), "little") | 1
    return key_id, key


class FrameKeys:
    """The keyring of one tenant: the current key (writes) and kept previous keys (reads only)."""

    def __init__(self, secret: bytes, previous: Iterable[bytes] = ()) -> None:
        for value in (secret, *previous):
            if len(value) < MIN_SECRET_BYTES:
                raise ConfigError(f"an auth secret must have at least {MIN_SECRET_BYTES} bytes, "
                                  f"got one of {len(value)} bytes")
        self.key_id, current = _derive(secret)
        self._keys: dict[int, bytes] = {self.key_id: current}
        for old in previous:
            old_id, old_key = _derive(old)
            if old_id in self._keys and self._keys[old_id] != old_key:
                raise ConfigError("two auth secrets derive the same key id; replace one of them")
            self._keys.setdefault(old_id, old_key)

    @classmethod
    def from_config(cls, config: AuthConfig) -> FrameKeys | None:
        """The keyring ``config`` describes (``secret`` or ``secret_file``, plus ``previous_secrets``),
        or ``None`` when no secret is configured (frames then carry only their checksum)."""
        secret = config.secret
        if config.secret_file:
            if secret:
                raise ConfigError("set either auth.secret or auth.secret_file, not both")
            try:
                secret = Path(config.secret_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read auth.secret_file {config.secret_file}: {exc.strerror}") from None
        if not secret:
            if config.previous_secrets:
                raise ConfigError("auth.previous_secrets is set but auth.secret is empty")
            return None
        return cls(secret.encode(), [s.encode() for s in config.previous_secrets])

    def mac(self, key_id: int, parts: Iterable[bytes | memoryview]) -> bytes | None:
        """The MAC of ``parts`` under key ``key_id``, or ``None`` if this ring does not hold that key."""
        key = self._keys.get(key_id)
        if key is None:
            return None
        hasher = blake3.blake3(key=key)  # one thread: BLAKE3's own threads were no faster here (bench auth)
        for part in parts:
            hasher.update(part)
        return hasher.digest()


_warned: set[str] = set()


def warn_unauthenticated(tier: str) -> None:
    """Log once per tier name that a tier other users can write is used without a secret."""
    if tier in _warned:
        return
    _warned.add(tier)
    log.warning("tier %s can be written by other users but no auth.secret is set: chunks are only "
                "checksummed, so anyone who can write to it can make this engine use their KV", tier)
