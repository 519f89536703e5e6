"""The worker's asynchronous loader (``kvtier_load_async``): one thread, at a lower CPU priority than the
engine's, so that a load running beside the forward pass takes what the cores have to spare before it
takes time from the forward pass. Pure Python (no vLLM, no torch).

On Linux a nice value belongs to a thread (:mod:`kvtier.nice`): raising the loader's leaves the engine's
threads as they are. The storage manager's reader threads read each batch at the priority of the
thread that asked for it, so an asynchronous load's disk or network reads run at the loader's value
too, and a synchronous load's (on the engine's thread) at the engine's.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from kvtier.errors import ConfigError
from kvtier.nice import set_thread_nice, thread_nice

log = logging.getLogger(__name__)

#: default nice value of the loader thread (``kvtier_load_nice``)
LOAD_NICE = 10


def check_nice(value: object) -> int:
    """``value`` as a loader nice value (0-19); :class:`ConfigError` naming the key otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise ConfigError(f"kvtier_load_nice must be a nice value from 0 to 19, got {value!r}")
    return value


def loader(nice: int) -> ThreadPoolExecutor:
    """The one-thread executor of asynchronous loads; its thread runs at nice ``nice`` (or at the
    process's, if that is higher: lowering it would need privileges)."""
    return ThreadPoolExecutor(1, thread_name_prefix="kvtier-load", initializer=_lower_priority, initargs=(nice,))


def _lower_priority(nice: int) -> None:
    if thread_nice() < nice and not set_thread_nice(nice):
        log.warning("kvtier: cannot lower the loader thread's priority; it runs at the engine's")
