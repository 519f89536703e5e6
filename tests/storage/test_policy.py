"""Eviction policies: each evicts what its definition says and skips busy keys."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.storage.policy import POLICIES, make_policy


def _fill(name: str, keys: list[int]):
    policy = make_policy(name)
    for k in keys:
        policy.insert(k)
    return policy


def test_lru_evicts_least_recently_used() -> None:
    p = _fill("lru", [1, 2, 3])
    p.touch(1)
    assert p.victim(lambda k: True) == 2
    assert p.victim(lambda k: True) == 3
    assert p.victim(lambda k: True) == 1
    assert p.victim(lambda k: True) is None


def test_fifo_ignores_hits() -> None:
    p = _fill("fifo", [1, 2, 3])
    p.touch(1)
    assert p.victim(lambda k: True) == 1


def test_lfu_evicts_least_frequent_then_oldest() -> None:
    p = _fill("lfu", [1, 2, 3])
    for _ in range(3):
        p.touch(1)
    p.touch(3)
    assert p.victim(lambda k: True) == 2
    assert p.victim(lambda k: True) == 3
    assert p.victim(lambda k: True) == 1


def test_s3fifo_one_hit_wonders_leave_first() -> None:
    p = _fill("s3fifo", list(range(10)))
    for k in (0, 1, 2):
        p.touch(k)
    evicted = [p.victim(lambda k: True) for _ in range(7)]
    assert set(evicted) == set(range(3, 10))
    assert len(p) == 3


def test_s3fifo_ghost_readmits_to_main() -> None:
    p = _fill("s3fifo", [1, 2])
    assert p.victim(lambda k: True) == 1
    p.insert(1)  # remembered by the ghost queue: goes to main
    p.insert(3)
    assert p.victim(lambda k: True) in (2, 3)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_busy_keys_are_skipped_and_remove_forgets(name: str) -> None:
    p = _fill(name, [1, 2, 3])
    assert p.victim(lambda k: k == 3) == 3
    assert p.victim(lambda k: False) is None
    p.remove(1)
    assert len(p) == 1
    assert p.victim(lambda k: True) == 2


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match=r"'mru'.*fifo"):
        make_policy("mru")
