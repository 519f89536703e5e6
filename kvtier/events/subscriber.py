"""A minimal subscriber of vLLM-format KV events (kvtier's or vLLM's own publisher): what an external
KV-aware router does. SUB socket for live batches, a DEALER for replay; the decoder is given (kvtier's
:class:`~kvtier.events.schema.KVEventBatch` by default, or vLLM's own class)."""

from __future__ import annotations

from typing import Any

import msgspec

from kvtier.events.publisher import END_SEQ
from kvtier.events.schema import KVEventBatch


class Subscriber:
    """Receives ``(seq, batch)`` pairs from ``endpoint`` (topic prefix ``topic``); replays from
    ``replay`` (the publisher's ROUTER endpoint)."""

    def __init__(self, endpoint: str, replay: str | None = None, topic: str = "", batch_type: Any = KVEventBatch,
                 timeout_ms: int = 10_000) -> None:
        import zmq

        self._zmq = zmq
        self.decoder = msgspec.msgpack.Decoder(type=batch_type)
        self.ctx: Any = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sub.connect(endpoint)
        self.replay = replay
        self.timeout_ms = timeout_ms

    def recv(self, timeout_ms: int | None = None) -> tuple[int, Any] | None:
        """The next live batch, or ``None`` after ``timeout_ms`` without one."""
        if not self.sub.poll(self.timeout_ms if timeout_ms is None else timeout_ms):
            return None
        _topic, seq, payload = self.sub.recv_multipart()
        return int.from_bytes(seq, "big"), self.decoder.decode(payload)

    def drain(self, idle_ms: int = 1500) -> list[tuple[int, Any]]:
        """Every live batch until none arrived for ``idle_ms``."""
        out: list[tuple[int, Any]] = []
        while (got := self.recv(idle_ms)) is not None:
            out.append(got)
        return out

    def replay_from(self, start: int) -> list[tuple[int, Any]]:
        """Every batch the publisher still buffers with ``seq >= start``, in order."""
        if self.replay is None:
            raise ValueError("this subscriber has no replay endpoint")
        req = self.ctx.socket(self._zmq.DEALER)
        req.connect(self.replay)
        req.send_multipart((b"", start.to_bytes(8, "big")))
        out: list[tuple[int, Any]] = []
        try:
            while True:
                if not req.poll(self.timeout_ms):
                    raise TimeoutError(f"replay endpoint {self.replay} did not answer")
                _empty, _topic, seq, payload = req.recv_multipart()
                if seq == END_SEQ:
                    return out
                out.append((int.from_bytes(seq, "big"), self.decoder.decode(payload)))
        finally:
            req.close(linger=0)

    def close(self) -> None:
        self.sub.close(linger=0)
