"""The asynchronous loader's thread (:mod:`kvtier.integrations.vllm.loader`): its nice value is raised,
the calling thread's (the engine's) is not, and bad ``kvtier_load_nice`` values are named."""

from __future__ import annotations

import os
import threading

import pytest

from kvtier.errors import ConfigError
from kvtier.integrations.vllm.loader import LOAD_NICE, check_nice, loader


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_loader_thread_alone_runs_at_the_lower_priority() -> None:
    before = _nice()
    pool = loader(LOAD_NICE)
    try:
        inside = pool.submit(_nice).result()
        again = pool.submit(_nice).result()  # the same thread keeps it
    finally:
        pool.shutdown(wait=True)
    assert inside == again == max(LOAD_NICE, before)
    assert _nice() == before  # per thread: the caller (the engine's thread) is unchanged


def test_a_nice_value_below_the_process_is_left_alone() -> None:
    pool = loader(0)
    try:
        assert pool.submit(_nice).result() == _nice()
    finally:
        pool.shutdown(wait=True)


@pytest.mark.parametrize("value", [-1, 20, True, 1.5, "10", None])
def test_bad_nice_values_are_named(value: object) -> None:
    with pytest.raises(ConfigError, match="kvtier_load_nice"):
        check_nice(value)


def test_good_nice_values_pass() -> None:
    assert [check_nice(v) for v in (0, LOAD_NICE, 19)] == [0, LOAD_NICE, 19]
