"""The one retry policy: delays double per consecutive failure up to the cap; a success resets."""

from __future__ import annotations

import time

from kvtier.backoff import Backoff


def test_delay_doubles_up_to_the_cap_and_a_success_resets() -> None:
    b = Backoff(0.5, 2.0)
    assert b.ready(time.monotonic()) and b.failures == 0
    assert [b.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    now = time.monotonic()
    assert not b.ready(now) and b.ready(now + 2.0)  # due once the last delay has passed
    assert b.succeeded() == 5  # how many failures the success ended
    assert b.ready(time.monotonic()) and b.failures == 0
    assert b.failed() == 0.5  # counting starts over
    assert b.succeeded() == 1 and b.succeeded() == 0
