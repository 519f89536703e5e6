"""Exponential backoff over consecutive failures: the one retry policy of kvtier's clients.

Used for a storage tier (the manager skips it while backing off), a router backend (out of rotation),
the router's controller lookups (a fixed pause: ``base_s == max_s``), the remote tier's retries within
one call, and the cluster agent's controller loops (how long to wait before the next try).

Invariants: after the n-th failure in a row the next try is due ``min(max_s, base_s * 2**(n-1))``
seconds later (:meth:`Backoff.ready` is False until then); one success resets the count and makes the
next try due at once. Not thread-safe by itself: its owner serializes the calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Backoff:
    base_s: float
    max_s: float
    failures: int = 0  # consecutive failures since the last success
    retry_at: float = 0.0  # monotonic time at which the next try is due

    def failed(self) -> float:
        """Count a failure; return the delay until the next try is due."""
        self.failures += 1
        delay = min(self.max_s, self.base_s * 2 ** (self.failures - 1))
        self.retry_at = time.monotonic() + delay
        return delay

    def succeeded(self) -> int:
        """Reset after a success; return how many failures it ended."""
        ended, self.failures, self.retry_at = self.failures, 0, 0.0
        return ended

    def ready(self, now: float) -> bool:
        """The next try is due at monotonic time ``now``."""
        return now >= self.retry_at
