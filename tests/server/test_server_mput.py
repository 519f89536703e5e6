"""MputBody on a real socket pair: frames received whole, their structure checked, nothing more."""

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
def test_frames_are_received_whole_and_their_structure_checked(pause_after: int | None) -> None:
    frames = make_frames(4, SPEC, seed=7)
    damaged = bytearray(frames[1][1])
    damaged[len(damaged) // 2] ^= 1  # payload bytes: the reader's checksum finds it, not the server
    short = bytearray(frames[3][1])
    short[wire.HEADER_BYTES + 1 :] = short[wire.HEADER_BYTES + 2 :] + b"\0"  # metadata shifted: unreadable
    items = [frames[0], (frames[1][0], bytes(damaged)), (frames[0][0], frames[2][1]), (frames[3][0], bytes(short))]
    body = b"".join(P.MPUT_ITEM.pack(k, len(f)) + f for k, f in items)
    state = receive(body, 4, prefix=5000, pause_after=pause_after)
    assert [bytes(f) for _k, f, _why in state.items] == [f for _k, f in items]
    whys = [why for _k, _f, why in state.items]
    assert whys[:2] == ["", ""]  # stored as given: integrity is end to end
    assert whys[2].startswith(f"frame holds key {frames[2][0].hex()}, request names {frames[0][0].hex()}")
    assert whys[3]  # structure broken: refused
    assert state.received == len(body) - 5000


def test_the_server_check_reads_no_payload_but_a_reload_check_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_frame never hashes the payload; check_intact (the server's disk reload) does."""
    from kvtier.errors import CorruptChunk

    key, frame = make_frames(1, SPEC, seed=8)[0]
    damaged = bytearray(frame)
    damaged[-3] ^= 0x10
    wire.check_frame(bytes(damaged), key)
    wire.check_intact(frame, key)
    with pytest.raises(CorruptChunk, match="checksum mismatch"):
        wire.check_intact(bytes(damaged), key)

    def no_hash(*_args: object) -> int:
        raise AssertionError("check_frame hashed the payload")

    monkeypatch.setattr(wire, "_checksum", no_hash)
    wire.check_frame(frame, key)


class _Recorder:
    """A real socket whose receives are recorded with the receive mark set at the time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[tuple[int, int]] = []  # (SO_RCVLOWAT, bytes asked for)

    def getsockopt(self, *args: int) -> int:
        return self.sock.getsockopt(*args)

    def setsockopt(self, *args: int) -> None:
        self.sock.setsockopt(*args)

    def recv_into(self, view: memoryview, nbytes: int, flags: int) -> int:
        self.calls.append((self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), len(view)))
        return self.sock.recv_into(view, nbytes, flags)


def test_the_receive_mark_is_raised_but_never_past_what_the_message_still_brings() -> None:
    """Over real loopback TCP: while receiving, the kernel's wake-up mark (SO_RCVLOWAT) is raised, each
    receive ends at least that many bytes before the message does (the kernel compares the mark with
    what is queued, so a receive waiting for the message's last bytes under a higher mark would sleep
    until its timeout), and the mark is back at 1 afterwards (the event loop reads small requests)."""
    frames = make_frames(6, SPEC, seed=9)
    body = b"".join(P.MPUT_ITEM.pack(k, len(f)) + f for k, f in frames)
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as theirs:
        ours, _addr = listener.accept()
        with ours:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # room for the mark
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
            sender = threading.Thread(target=theirs.sendall, args=(body,))
            sender.start()
            state = mput.MputBody(len(frames), len(body), 1 << 20, lambda n: np.empty(n, dtype=np.uint8))
            recorder = _Recorder(ours)
            assert state.run(recorder)  # type: ignore[arg-type]
            sender.join()
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert [bytes(f) for _k, f, _why in state.items] == [f for _k, f in frames]
    assert max(mark for mark, _n in recorder.calls) == mput.LOWAT
    unread = len(body)
    for mark, asked in recorder.calls:  # every receive got all it asked for (MSG_WAITALL, no timeout)
        assert mark == 1 or unread - asked >= mark
        unread -= asked
    assert unread == 0
