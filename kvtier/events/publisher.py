"""ZMQ publisher of :class:`~kvtier.events.schema.KVEventBatch` es with vLLM's ``--kv-events-config``
conventions, so a consumer of vLLM's stream (llm-d's KV indexer, Dynamo's KV router) reads kvtier's:

- PUB socket: every batch is the 3-frame message ``(topic, seq, payload)``, ``seq`` an 8-byte
  big-endian counter starting at 0, ``payload`` the msgpack batch.
- ROUTER socket (optional, ``replay_endpoint``): a client sends ``(b"", start_seq)`` (8 bytes, big
  endian; a DEALER/REQ adds the empty delimiter); it receives ``(b"", topic, seq, payload)`` for every
  buffered batch with ``seq >= start_seq``, then ``(b"", b"", -1 as 8 signed bytes, b"")``.

Secure by default: only loopback endpoints (``tcp://127.0.0.1:*``, ``tcp://localhost:*``, ``ipc://``,
``inproc://``) unless ``allow_remote`` is set (ZMQ offers no token check a third-party subscriber
would pass; put it behind a network boundary). Bounded everywhere: the publish queue drops (and counts)
when full, the replay buffer keeps the last ``buffer_steps`` batches, replay requests of a wrong shape
are ignored. Publishing never blocks the caller.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from itertools import count
from typing import Any

import msgspec

from kvtier.errors import ConfigError
from kvtier.events.schema import Event, KVEventBatch
from kvtier.queues import wait_done

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_LOCAL = ("tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


def check_endpoint(endpoint: str, allow_remote: bool) -> str:
    """``endpoint`` if it may be bound; :class:`ConfigError` naming it otherwise."""
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"events endpoint {endpoint!r} must start with tcp://, ipc:// or inproc://")
    if not allow_remote and not endpoint.startswith(_LOCAL):
        raise ConfigError(f"events endpoint {endpoint!r} is not loopback; set allow_remote to publish off this host")
    return endpoint


class ZmqPublisher:
    """Binds a PUB (and optionally a ROUTER replay) socket and publishes batches from one thread."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
                 buffer_steps: int = 10_000, hwm: int = 100_000, max_queue: int = 10_000,
                 allow_remote: bool = False, data_parallel_rank: int = 0) -> None:
        import zmq

        self.topic = topic.encode()
        self.rank = data_parallel_rank
        self.counters: collections.Counter[str] = collections.Counter()
        self._queue: queue.Queue[list[Event] | None] = queue.Queue(maxsize=max_queue)
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self._seq = count()
        self._ctx: Any = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._replay: Any = None
        try:
            self._pub.bind(check_endpoint(endpoint, allow_remote))
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.replay_endpoint: str | None = None
            if replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(check_endpoint(replay_endpoint, allow_remote))
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._close_sockets()
            raise
        self._encoder = msgspec.msgpack.Encoder()
        self._thread = threading.Thread(target=self._run, name="kvtier-events", daemon=True)
        self._thread.start()
        log.info("kvtier KV events on %s (replay %s, topic %r)", self.endpoint, self.replay_endpoint, topic)

    def publish(self, events: list[Event]) -> bool:
        """Queue ``events`` as one batch; False (counted) when the queue is full."""
        if not events:
            return True
        try:
            self._queue.put_nowait(events)
            return True
        except queue.Full:
            self.counters["batches_dropped"] += 1
            return False

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                events = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                if events is None:
                    return
                self._send(events)
            except Exception:
                self.counters["publish_errors"] += 1
                log.exception("publishing KV events failed")
            finally:
                self._queue.task_done()

    def _send(self, events: list[Event]) -> None:
        seq = next(self._seq)
        payload = self._encoder.encode(KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self.rank))
        self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))
        self.counters["batches"] += 1
        self.counters["events"] += len(events)

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            self.counters["bad_replay_requests"] += 1
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
        self.counters["replays"] += 1

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until every queued batch was sent."""
        return wait_done(self._queue, timeout_s)

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (bounded), stop the thread, close the sockets."""
        self.flush(timeout_s)
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout=timeout_s)
        self._close_sockets()
