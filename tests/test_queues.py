"""queues.wait_done: True once every item is done, False when the time runs out first."""

from __future__ import annotations

import queue
import threading

from kvtier.queues import wait_done


def test_wait_done_returns_when_the_worker_marks_the_last_item_done() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(3):
        q.put(i)
    release = threading.Event()

    def worker() -> None:
        release.wait(10)
        for _ in range(3):
            q.get()
            q.task_done()

    thread = threading.Thread(target=worker)
    thread.start()
    assert wait_done(q, 0.05) is False  # nothing done yet
    release.set()
    assert wait_done(q, 10) is True
    assert q.unfinished_tasks == 0
    thread.join()


def test_wait_done_on_an_idle_queue_and_a_negative_timeout() -> None:
    q: queue.Queue[int] = queue.Queue()
    assert wait_done(q, 0) is True
    q.put(1)
    assert wait_done(q, -1) is False
