"""One helper for the bounded work queues behind background writers."""

from __future__ import annotations

import queue
from typing import Any


def wait_done(q: queue.Queue[Any], timeout_s: float) -> bool:
    """Wait until every item put on ``q`` was marked done (``task_done``); False if ``timeout_s``
    passed first. Wakes on the queue's own condition (the one ``Queue.join`` waits on), not by polling,
    so a synchronous caller resumes as soon as the last item is done."""
    with q.all_tasks_done:
        return q.all_tasks_done.wait_for(lambda: not q.unfinished_tasks, timeout=max(0.0, timeout_s))
