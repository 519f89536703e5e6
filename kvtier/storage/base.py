"""The contract of a serialized storage tier (disk, cache server, Redis, shared filesystem).

A tier stores opaque wire frames (see :mod:`kvtier.wire`) under 16-byte chunk keys; it never
interprets the payload. Contract for every implementation:

- ``put(key, frame)`` stores the frame atomically: a concurrent or later ``get`` sees either nothing or
  the complete frame, never a prefix. It may evict other keys to respect its capacity.
- ``get(key)`` returns the frame last put under ``key`` or ``None``. It need not verify the frame (the
  manager does) but must never return a partial one.
- ``exists(keys)`` answers for many keys in one call, in order.
- ``get_many(keys)`` / ``put_many(items)`` are ``get`` / ``put_parts`` of many keys in one call (a tier
  batches them into fewer round trips or overlaps them); results come back in the order asked. A
  failure of the store raises :class:`~kvtier.errors.TierUnavailable` for the whole call: the caller
  treats every key of it as missed (reads) or not written (writes).
- Every method raises :class:`~kvtier.errors.TierUnavailable` (and only that) when the backing store
  cannot be reached, so the manager can treat it as a miss and back off.
- A :class:`ScatteredTier` also reads one payload straight into several buffers (scattered caller
  memory: an engine's per-layer K and V rows), with the same contract as ``get_each_into``.
- ``discard(key)`` is called by the manager when a frame failed verification: the tier removes it (a
  tier with a quarantine area moves it there) and counts it.
- Tiers are thread-safe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from kvtier.keys import ChunkKey


class Tier(ABC):
    name: str = ""

    def private(self) -> bool:
        """True when no other user can write what this tier stores, so frames without a MAC can only
        come from this user's own processes. Default False: a server, Redis or a shared directory may be
        written by anyone who reaches it."""
        return False

    @abstractmethod
    def put(self, key: ChunkKey, frame: bytes) -> None: ...

    def put_parts(self, key: ChunkKey, parts: Sequence[bytes | memoryview]) -> None:
        """``put(key, b"".join(parts))``; a tier that can write the parts without joining overrides it.
        The parts may be views of memory the caller reuses once this returns."""
        self.put(key, b"".join(parts))

    def put_many(self, items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        """``put_parts`` of every ``(key, parts)`` (same atomicity per key; the parts may be views the
        caller reuses once this returns). Default: one ``put_parts`` after the other."""
        for key, parts in items:
            self.put_parts(key, parts)

    @abstractmethod
    def get(self, key: ChunkKey) -> bytes | None: ...

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | memoryview | None]:
        """``get`` of every key, in order; the results are the caller's (never a buffer the tier
        reuses). Default: one ``get`` after the other."""
        return [self.get(key) for key in keys]

    def get_many_into(
        self, keys: Sequence[ChunkKey], payloads: Sequence[memoryview]
    ) -> list[bytes | memoryview | None]:
        """``get_into(keys[i], payloads[i])`` for every ``i``, in order (a ``None`` means: use
        ``get_many`` for that key): :meth:`get_each_into` with the heads collected."""
        heads: list[bytes | memoryview | None] = [None] * len(keys)
        self.get_each_into(keys, payloads, heads.__setitem__)
        return heads

    def get_each_into(self, keys: Sequence[ChunkKey], payloads: Sequence[memoryview],
                      fn: Callable[[int, bytes | memoryview | None], None]) -> None:
        """``get_many_into``, handing each head to ``fn(i, head)`` exactly once, in order of ``i``, as
        soon as payload ``i`` is in place (before payload ``i+1`` is read, so the caller can verify and
        copy chunk ``i`` meanwhile). An exception from ``fn`` ends the call: no payload is written after
        it. Default: one ``get_into`` after the other; a tier that batches reads overrides this."""
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys but {len(payloads)} payload buffers")
        for i, (key, payload) in enumerate(zip(keys, payloads)):
            fn(i, self.get_into(key, payload))

    def get_into(self, key: ChunkKey, payload: memoryview) -> bytes | memoryview | None:
        """Zero-copy read: place the stored payload of ``key`` straight into ``payload`` (which must be
        exactly its size) and return the frame's head (fixed header + metadata), unverified (see
        :func:`kvtier.frames.unpack_head_into`). ``None`` when the key is missing, the sizes differ or the
        tier cannot read into caller memory; the caller then falls back to ``get``. Default: None."""
        return None

    @abstractmethod
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool: ...

    def discard(self, key: ChunkKey) -> None:
        """Drop a frame that failed verification (default: delete it)."""
        self.delete(key)

    @abstractmethod
    def clear(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files; default does nothing."""

    def stats(self) -> dict[str, int | float]:
        """Tier-specific numbers for ``CacheEngine.stats()`` (default none)."""
        return {}


class ScatteredTier(Tier):
    """A tier that can place one stored payload into several buffers, filled in order (``preadv`` /
    ``recvmsg_into``): the typed capability the storage manager checks before it hands a tier a
    payload as buffers (:attr:`kvtier.storage.manager.Load.into`)."""

    @abstractmethod
    def get_into_parts(self, key: ChunkKey, parts: Sequence[memoryview]) -> bytes | memoryview | None:
        """:meth:`Tier.get_into` with the payload's destination given as ``parts`` (their concatenation
        is the payload; their total must be exactly its size, else ``None`` and the parts untouched)."""

    def get_into(self, key: ChunkKey, payload: memoryview) -> bytes | memoryview | None:
        return self.get_into_parts(key, (payload,))

    def get_each_into_parts(self, keys: Sequence[ChunkKey], payloads: Sequence[Sequence[memoryview]],
                            fn: Callable[[int, bytes | memoryview | None], None]) -> None:
        """:meth:`Tier.get_each_into` with each payload given as buffers (see :meth:`get_into_parts`).
        Default: one ``get_into_parts`` after the other; a tier that batches reads overrides this."""
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys but {len(payloads)} payload destinations")
        for i, (key, parts) in enumerate(zip(keys, payloads)):
            fn(i, self.get_into_parts(key, parts))

    def get_each_into(self, keys: Sequence[ChunkKey], payloads: Sequence[memoryview],
                      fn: Callable[[int, bytes | memoryview | None], None]) -> None:
        self.get_each_into_parts(keys, [(payload,) for payload in payloads], fn)
