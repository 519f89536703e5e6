"""One helper that cuts a sequence of items into consecutive batches bounded by count and bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def cut(items: Iterable[T], max_count: int, max_bytes: int, size: Callable[[T], int],
        breaks: Callable[[T, T], bool] | None = None) -> list[list[T]]:
    """``items`` in order, cut into consecutive non-empty batches.

    Invariants: concatenating the batches gives ``items`` back; a batch holds at most ``max_count``
    items and at most ``max_bytes`` by ``size``, except that an item larger than ``max_bytes`` forms a
    batch of its own; a new batch starts before every item for which ``breaks(previous, item)`` is
    true. A batch is closed only when the next item would not fit (greedy)."""
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    out: list[list[T]] = []
    total = 0
    for item in items:
        nbytes = size(item)
        last = out[-1] if out else None
        if (last is None or len(last) >= max_count or total + nbytes > max_bytes
                or (breaks is not None and breaks(last[-1], item))):
            out.append([item])
            total = nbytes
        else:
            last.append(item)
            total += nbytes
    return out
