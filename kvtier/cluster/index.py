"""The controller's global chunk index and the key chain it computes lookups with (no torch here).

Invariants of :class:`ChunkIndex`:
- It holds, per instance and tier, the set of chunk keys that instance reported (admit adds, evict
  discards, a snapshot replaces); operations are idempotent, so replaying events after a snapshot that
  already contains them leaves the true state.
- A key maps to every instance holding it (a set, not a last writer): one holder's evict never hides
  another holder.
- Bounded: an instance holds at most ``max_keys_per_instance`` keys and the index at most
  ``max_keys_total``; admits past a cap are dropped, counted and the instance is marked ``truncated``
  (its lookups can under-report, never over-report).
- ``drop(instance)`` removes every trace of the instance (used on heartbeat expiry).

:func:`chain_keys` reproduces :class:`kvtier.keys.Chunker` from a namespace root (a test checks they
agree), so the controller needs neither torch nor the workers' tenant salt: workers report their root.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from kvtier.keys import chain


def chain_keys(root: bytes, tokens: np.ndarray, chunk_tokens: int, partial: bool = True) -> list[tuple[int, bytes]]:
    """``(end, key)`` of each chunk of ``tokens`` (uint32 array) for a namespace whose first parent is
    ``root``: the same chain as :class:`kvtier.keys.Chunker`."""
    ids = np.ascontiguousarray(tokens, dtype="<u4")
    n = len(ids)
    stop = n if partial else n - n % chunk_tokens
    keys = chain(root, ids, chunk_tokens, -(-stop // chunk_tokens))
    return [(min(i * chunk_tokens, n), key) for i, key in enumerate(keys[1:], start=1)]


class ChunkIndex:
    """(instance, tier) -> keys and key -> holders. Not thread-safe: the controller's event loop owns it."""

    def __init__(self, max_keys_per_instance: int = 1 << 20, max_keys_total: int = 1 << 24) -> None:
        self.max_keys_per_instance = max_keys_per_instance
        self.max_keys_total = max_keys_total
        self._tiers: dict[str, dict[str, set[bytes]]] = {}
        self._sizes: Counter[str] = Counter()  # keys per instance, over its tiers
        self._holders: dict[bytes, Counter[str]] = {}  # key -> instance -> tiers of it holding the key
        self.total = 0
        self.truncated: set[str] = set()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        """Distinct keys held by any instance."""
        return len(self._holders)

    def admit(self, instance: str, tier: str, keys: Iterable[bytes]) -> int:
        """Record that ``instance`` holds ``keys`` in ``tier``; return how many were new."""
        held = self._tiers.setdefault(instance, {}).setdefault(tier, set())
        added = 0
        for key in keys:
            if key in held:
                continue
            if self._sizes[instance] >= self.max_keys_per_instance or self.total >= self.max_keys_total:
                self.counters["admits_dropped"] += 1
                self.truncated.add(instance)
                continue
            held.add(key)
            self._holders.setdefault(key, Counter())[instance] += 1
            self._sizes[instance] += 1
            self.total += 1
            added += 1
        self.counters["admits"] += added
        return added

    def evict(self, instance: str, tier: str, keys: Iterable[bytes]) -> int:
        """Record that ``instance`` no longer holds ``keys`` in ``tier``; return how many it held."""
        held = self._tiers.get(instance, {}).get(tier)
        if not held:
            return 0
        removed = 0
        for key in keys:
            if key in held:
                held.discard(key)
                self._forget(instance, key)
                removed += 1
        self.counters["evicts"] += removed
        return removed

    def _forget(self, instance: str, key: bytes) -> None:
        holders = self._holders[key]
        holders[instance] -= 1
        if holders[instance] <= 0:
            del holders[instance]
            if not holders:
                del self._holders[key]
        self._sizes[instance] -= 1
        self.total -= 1

    def replace(self, instance: str, tiers: dict[str, Iterable[bytes]]) -> None:
        """Make ``tiers`` the whole state of ``instance`` (a snapshot)."""
        self.drop(instance)
        for tier, keys in tiers.items():
            self.admit(instance, tier, keys)

    def drop(self, instance: str) -> int:
        """Forget ``instance``; return how many keys it held."""
        tiers = self._tiers.pop(instance, {})
        removed = 0
        for held in tiers.values():
            for key in held:
                self._forget(instance, key)
                removed += 1
        self._sizes.pop(instance, None)
        self.truncated.discard(instance)
        return removed

    def holders(self, key: bytes) -> list[str]:
        """Instances holding ``key`` in any tier."""
        return list(self._holders.get(key, ()))

    def prefix(self, keys: Sequence[bytes], candidates: Iterable[str]) -> dict[str, int]:
        """For each candidate instance holding ``keys[0]``, how many leading ``keys`` it holds."""
        alive = set(candidates)
        hits: dict[str, int] = {}
        for i, key in enumerate(keys):
            holders = self._holders.get(key)
            if not holders:
                break
            alive = {inst for inst in alive if inst in holders}
            if not alive:
                break
            for inst in alive:
                hits[inst] = i + 1
        return hits

    def counts(self, instance: str) -> dict[str, int]:
        """Keys per tier of ``instance``."""
        return {tier: len(keys) for tier, keys in self._tiers.get(instance, {}).items()}

    def keys_of(self, instance: str, tier: str | None = None) -> list[bytes]:
        """Keys ``instance`` holds (in ``tier``, or in any tier)."""
        tiers = self._tiers.get(instance, {})
        if tier is not None:
            return list(tiers.get(tier, ()))
        out: set[bytes] = set()
        for held in tiers.values():
            out |= held
        return list(out)
