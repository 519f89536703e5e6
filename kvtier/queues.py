"""One helper for the bounded work queues behind background writers."""

from __future__ import annotations

import queue
import time
from typing import Any


def wait_done(q: queue.Queue[Any], timeout_s: float) -> bool:
    """Wait until every item put on ``q`` was marked done (``task_done``); False if ``timeout_s``
    passed first."""
    deadline = time.monotonic() + timeout_s
    while q.unfinished_tasks:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
