"""Per-thread CPU priority (nice values). Pure Python.

On Linux a nice value belongs to a thread, not to the process, and a new thread inherits the value of
the thread that started it. Raising a thread's nice value (lower priority) is always allowed; lowering
it again needs privileges (``CAP_SYS_NICE`` or ``RLIMIT_NICE``). Elsewhere ``os.setpriority`` on a
thread id may not exist or may act on the process: :func:`set_thread_nice` then reports False.
"""

from __future__ import annotations

import os
import threading


def thread_nice() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def set_thread_nice(nice: int) -> bool:
    """Set the calling thread's nice value (and only this thread's, on Linux); True when it holds it
    afterwards, False when the system refused (a lower value without privileges)."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) != nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        return False
    return True
