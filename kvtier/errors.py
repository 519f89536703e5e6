"""The one exception hierarchy of kvtier.

Every error kvtier raises on purpose derives from :class:`KvtierError`, so an engine integration can
catch one type and fall back to recompute.
"""

from __future__ import annotations


class KvtierError(Exception):
    """Base of every error raised by kvtier."""


class ConfigError(KvtierError):
    """A configuration key or value is invalid; the message names the key, the value and what is allowed."""


class CorruptChunk(KvtierError):
    """A stored chunk failed its integrity check (checksum, length, header or token mismatch)."""


class TierUnavailable(KvtierError):
    """A storage tier cannot be reached or refused the operation; callers treat it as a miss."""


class ProtocolError(KvtierError):
    """A peer sent a malformed or oversize message."""


class AuthError(KvtierError):
    """A peer presented a missing or wrong token."""


class LayoutError(KvtierError):
    """A tensor does not match the KV spec it is used with."""


class FrameAuthError(CorruptChunk):
    """A chunk frame failed authentication: no MAC where one is required, a key id this keyring does
    not hold, or a MAC that does not match (forged, another tenant's, or damaged). Counted apart from
    checksum failures (``mac_failures``) and, like them, a miss."""
