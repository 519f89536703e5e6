"""Eviction policies: LRU, LFU, FIFO and S3-FIFO over opaque hashable keys.

Contract for every policy: the owner calls ``insert`` once per new key, ``touch`` on every hit and
``remove`` when it drops a key itself; ``victim(evictable)`` returns the key the policy would evict
next among those for which ``evictable(key)`` is true (pinned or in-use keys are skipped), or ``None``,
and forgets the returned key. A policy never holds more keys than were inserted and not removed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable

from kvtier.errors import ConfigError

Evictable = Callable[[Hashable], bool]


class Policy(ABC):
    @abstractmethod
    def insert(self, key: Hashable) -> None: ...

    @abstractmethod
    def touch(self, key: Hashable) -> None: ...

    @abstractmethod
    def remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def victim(self, evictable: Evictable) -> Hashable | None: ...

    @abstractmethod
    def __len__(self) -> int: ...


class _Queue(Policy):
    """FIFO order; LRU when ``touch`` moves the key to the back."""

    def __init__(self, *, recency: bool) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()
        self._recency = recency

    def insert(self, key: Hashable) -> None:
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        if self._recency and key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Evictable) -> Hashable | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class LFU(Policy):
    """Least frequently used; ties broken by least recent use. Buckets keyed by hit count."""

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}

    def _place(self, key: Hashable, freq: int) -> None:
        self._freq[key] = freq
        self._buckets.setdefault(freq, OrderedDict())[key] = None

    def _unplace(self, key: Hashable) -> int | None:
        freq = self._freq.pop(key, None)
        if freq is not None:
            bucket = self._buckets[freq]
            del bucket[key]
            if not bucket:
                del self._buckets[freq]
        return freq

    def insert(self, key: Hashable) -> None:
        self._unplace(key)
        self._place(key, 1)

    def touch(self, key: Hashable) -> None:
        freq = self._unplace(key)
        if freq is not None:
            self._place(key, freq + 1)

    def remove(self, key: Hashable) -> None:
        self._unplace(key)

    def victim(self, evictable: Evictable) -> Hashable | None:
        for freq in sorted(self._buckets):
            for key in self._buckets[freq]:
                if evictable(key):
                    self._unplace(key)
                    return key
        return None

    def __len__(self) -> int:
        return len(self._freq)


class S3FIFO(Policy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost FIFO of keys.

    New keys enter the small queue (or main, if the ghost remembers them). Evicting from small moves a
    key that was hit since insertion to main, else drops it into the ghost. Main is a FIFO with
    reinsertion while the hit counter (capped at 3) is positive.
    """

    def __init__(self, small_fraction: float = 0.1) -> None:
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._hits: dict[Hashable, int] = {}
        self._fraction = small_fraction

    def insert(self, key: Hashable) -> None:
        self.remove(key)
        self._hits[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: Hashable) -> None:
        if key in self._hits:
            self._hits[key] = min(self._hits[key] + 1, 3)

    def remove(self, key: Hashable) -> None:
        if self._hits.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def _remember(self, key: Hashable) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._main), 1):
            self._ghost.popitem(last=False)

    def _from_small(self, evictable: Evictable) -> Hashable | None:
        for _ in range(len(self._small)):
            key, _v = self._small.popitem(last=False)
            if self._hits[key] > 0:
                self._hits[key] = 0
                self._main[key] = None
            elif evictable(key):
                del self._hits[key]
                self._remember(key)
                return key
            else:
                self._small[key] = None
        return None

    def _from_main(self, evictable: Evictable) -> Hashable | None:
        for _ in range(4 * len(self._main)):
            if not self._main:
                break
            key, _v = self._main.popitem(last=False)
            if self._hits[key] > 0:
                self._hits[key] -= 1
                self._main[key] = None
            elif evictable(key):
                del self._hits[key]
                return key
            else:
                self._main[key] = None
        return None

    def victim(self, evictable: Evictable) -> Hashable | None:
        small_first = len(self._small) >= self._fraction * len(self._hits)
        order = (self._from_small, self._from_main) if small_first else (self._from_main, self._from_small)
        for pick in order:
            key = pick(evictable)
            if key is not None:
                return key
        # Everything left was recently hit: fall back to any evictable key in main, then small.
        for queue in (self._main, self._small):
            for key in queue:
                if evictable(key):
                    del queue[key]
                    del self._hits[key]
                    return key
        return None

    def __len__(self) -> int:
        return len(self._hits)


POLICIES: dict[str, Callable[[], Policy]] = {
    "lru": lambda: _Queue(recency=True),
    "fifo": lambda: _Queue(recency=False),
    "lfu": LFU,
    "s3fifo": S3FIFO,
}


def make_policy(name: str) -> Policy:
    """Return a fresh policy called ``name``; raise :class:`ConfigError` listing the valid names."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; expected one of {sorted(POLICIES)}") from None
