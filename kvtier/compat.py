"""Stand-ins for standard-library features newer than the oldest Python kvtier supports (3.10).

- :func:`async_timeout`: ``asyncio.timeout`` (3.11+), else the ``async-timeout`` package. Either raises
  ``asyncio.TimeoutError`` when the deadline passes, which *is* ``TimeoutError`` from 3.11 on; on 3.10
  code catching a timeout from asyncio (``async_timeout``, ``asyncio.wait_for``) must name
  ``asyncio.TimeoutError``.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout as async_timeout
else:  # pragma: no cover - exercised on Python 3.10 only
    from async_timeout import timeout as async_timeout

__all__ = ["async_timeout"]
