"""Receive buffers of dropped frames, kept for the next request body of the same size.

A PUT body lands in a buffer of exactly its size. A fresh buffer costs the kernel a page fault and a
zeroed page per 4 KiB (or 2 MiB) as bytes arrive; on a loopback store of 8K tokens that was ~40% of
the server's CPU samples (``clear_page_erms``, ``exc_page_fault``; ``perf record -g`` on the server
during ``kvtier bench server``). A frame the store drops (evicted, replaced, deleted, cleared, or
refused after it was received) is kept here instead, its pages already committed, and handed to the
next body of the same size.

Invariants:
- A buffer is kept only when nothing else references it: every reader of a frame (a reply being sent,
  a memoryview or numpy view of it, an I/O thread's ``recv_into``/``sendmsg``) holds a reference to
  the array, and :meth:`BufferPool.offer` counts them (calibrated at import, not assumed: CPython
  versions count their own temporaries differently). A buffer still read is left to the garbage
  collector, never reused, so bytes a reader sees never change under it. Whoever hands a frame's memory
  to the kernel asynchronously (without a Python reference until it is done) must not use pooled frames.
- The pool holds budget: each kept buffer holds its size in the server's request
  :class:`~kvtier.server.app.ByteBudget` (the one that bounds bodies being received), so kept buffers
  plus bodies in flight never exceed ``max_inflight_bytes``. A buffer is kept only if that budget has
  room without anyone waiting, and every buffer is dropped (freed) as soon as a body would otherwise
  wait for budget: the pool never delays a request and never raises the server's memory bound.
- :meth:`BufferPool.take` hands out a buffer of exactly the size asked for, or a fresh uninitialised
  one (``numpy.empty``: address space only, committed as bytes arrive). A kept buffer holds an old
  frame's bytes until the receive overwrites them; the server stores or serves a body only once it was
  received whole.
- ``take`` may run on an I/O thread (it then returns the budget through ``give_back``, which the
  server makes safe to call from any thread); ``offer`` and ``drop_all`` run on the event loop.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

MIN_POOLED = 64 << 10  # smaller bodies are cheap to allocate: not kept


def _refs(arr: Any) -> int:
    return sys.getrefcount(arr)


def _one_holder(arr: Any) -> int:
    return _refs(arr)


def _calibrate() -> int:
    """What :func:`_refs` counts inside :meth:`BufferPool.offer` for an array whose only other holder
    is one local variable of the caller (the store dropping it): the same call shape as that path."""
    held = np.empty(1, dtype=np.uint8)
    return _one_holder(held)


_ALONE = _calibrate()


class BufferPool:
    """Kept receive buffers by exact size; ``hold(n)`` / ``give_back(n)`` take and return budget bytes
    without waiting (``hold`` returns False when it cannot)."""

    def __init__(self, hold: Callable[[int], bool], give_back: Callable[[int], None]) -> None:
        self._hold = hold
        self._give_back = give_back
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.reused = 0
        self.kept = 0

    def take(self, n: int) -> np.ndarray:
        """A buffer of exactly ``n`` bytes: a kept one (its budget returned: the caller holds its own)
        or a fresh uninitialised one."""
        with self._lock:
            kept = self._free.get(n)
            if not kept:
                return np.empty(n, dtype=np.uint8)
            arr = kept.pop()
            if not kept:
                del self._free[n]
            self.bytes -= n
            self.reused += 1
        self._give_back(n)
        return arr

    def offer(self, frame: Any) -> None:
        """Keep ``frame`` if it is a buffer this pool can reuse, nothing else references it (see the
        module invariants: the caller holds it in one local variable) and the budget has room."""
        if not isinstance(frame, np.ndarray) or frame.base is not None or frame.dtype != np.uint8:
            return
        n = frame.nbytes
        if n < MIN_POOLED or _refs(frame) > _ALONE or not self._hold(n):
            return
        with self._lock:
            self._free.setdefault(n, []).append(frame)
            self.bytes += n
            self.kept += 1

    def drop_all(self) -> int:
        """Free every kept buffer and return its budget; return how many bytes were freed."""
        with self._lock:
            freed = self.bytes
            self._free.clear()
            self.bytes = 0
        if freed:
            self._give_back(freed)
        return freed

    def stats(self) -> dict[str, int]:
        return {"pool_bytes": self.bytes, "pool_buffers": sum(map(len, self._free.values())),
                "pool_reused": self.reused, "pool_kept": self.kept}
