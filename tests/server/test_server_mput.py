"""MputBody on a real socket pair: frames received in slices, checksummed as they arrive."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from server_support import make_frames

from kvtier import wire
from kvtier.layout import KVSpec
from kvtier.server import mput
from kvtier.storage import remote_protocol as P

SPEC = KVSpec(8, 4, 64, "float32", 16)  # 256 KiB frames


def receive(body: bytes, count: int, prefix: int, pause_after: int | None = None) -> mput.MputBody:
    """Send ``body`` over a socket pair (the first ``prefix`` bytes as if the event loop had buffered
    them, a pause after ``pause_after`` bytes) and receive it with :class:`mput.MputBody`."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(None)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
        state = mput.MputBody(count, len(body), 1 << 20, lambda n: np.empty(n, dtype=np.uint8))
        state.prefix = memoryview(body[:prefix])
        rest = body[prefix:]
        go_on = threading.Event()

        def send() -> None:
            cut = len(rest) if pause_after is None else pause_after
            theirs.sendall(rest[:cut])
            go_on.wait(10)
            theirs.sendall(rest[cut:])

        sender = threading.Thread(target=send)
        sender.start()
        stalls = 0
        while not state.run(ours):  # the receive timeout expired: resume where it stopped
            stalls += 1
            go_on.set()
        go_on.set()
        sender.join()
        assert stalls >= (pause_after is not None)
    return state


@pytest.mark.parametrize("pause_after", [None, 300_001])
def test_frames_are_checked_slice_by_slice_and_damage_is_found(monkeypatch: pytest.MonkeyPatch,
                                                                pause_after: int | None) -> None:
    monkeypatch.setattr(mput, "SLICE", 4096)  # ~64 slices per frame
    frames = make_frames(3, SPEC, seed=7)
    bad = bytearray(frames[1][1])
    bad[len(bad) // 2] ^= 1  # inside the payload, far from any slice edge of the prefix
    items = [frames[0], (frames[1][0], bytes(bad)), frames[2]]
    body = b"".join(P.MPUT_ITEM.pack(k, len(f)) + f for k, f in items)
    state = receive(body, 3, prefix=5000, pause_after=pause_after)
    assert [bytes(f) for _k, f, _why in state.items] == [f for _k, f in items]
    assert [why for _k, _f, why in state.items] == ["", "checksum mismatch", ""]
    assert state.received == len(body) - 5000


def test_a_given_digest_replaces_the_hash_pass() -> None:
    """check_frame trusts the caller's digest of ``frame[HEADER_BYTES:]`` instead of hashing again."""
    import xxhash

    from kvtier.errors import CorruptChunk

    key, frame = make_frames(1, SPEC, seed=8)[0]
    digest = xxhash.xxh3_64(frame[wire.HEADER_BYTES :]).intdigest()
    wire.check_frame(frame, key, digest)
    with pytest.raises(CorruptChunk, match="checksum"):
        wire.check_frame(frame, key, digest ^ 1)
