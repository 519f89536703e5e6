"""Hostile clients (loopback) must not hold the cache server down: idle strangers lose their slots,
announced-but-unsent bodies cost neither memory nor other clients' turns, and a stalled body is closed
cleanly. Generous timeouts: these assert that service happens, not how fast (that is a benchmark)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from server_attack import ServerProcess, make_frames, put_header, read_reply, request

from kvtier.errors import TierUnavailable
from kvtier.layout import KVSpec
from kvtier.storage import remote_protocol as P
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow

MiB = 1 << 20
BIG = KVSpec(num_layers=8, num_kv_heads=8, head_dim=64, dtype="float32", chunk_tokens=64)  # ~2 MiB frames


def test_idle_unauthenticated_connections_cannot_hold_every_slot(tmp_path: Path) -> None:
    env = {"KVTIER_SERVER__MAX_CONNECTIONS": "20"}  # default auth_timeout_s (10 s)
    with ServerProcess(tmp_path, token="right", env=env) as srv:
        squatters = [srv.connect() for _ in range(20)]
        try:
            served = False
            deadline = time.monotonic() + 30
            rid = 0
            while not served and time.monotonic() < deadline:
                for sock in squatters:  # PINGs are answered, but must not extend the deadline
                    rid += 1
                    with contextlib.suppress(OSError):
                        sock.sendall(request(P.Op.PING, rid))
                tier = RemoteTier("127.0.0.1", srv.port, "right", timeout_s=2.0, pool_size=1, retries=0)
                try:
                    tier.ping()
                    served = True
                except TierUnavailable:
                    time.sleep(0.2)
                finally:
                    tier.close()
            assert served, "20 idle unauthenticated connections kept a legitimate client out for 30 s"
        finally:
            for sock in squatters:
                sock.close()


def test_stalled_huge_put_headers_cost_no_memory_and_no_ones_turn(tmp_path: Path) -> None:
    frames = make_frames(2, seed=21)
    with ServerProcess(tmp_path, capacity="64MiB") as srv:
        rss_before = srv.rss()
        stalled = []
        for _i in range(5):  # each announces a 255 MiB frame and sends nothing more
            sock = srv.connect()
            sock.sendall(put_header(1, frames[0][0], 255 * MiB))
            stalled.append(sock)
        try:
            time.sleep(1.0)
            with srv.connect(timeout_s=10.0) as sock:
                sock.sendall(request(P.Op.PING, 7))
                h, _body = read_reply(sock)  # a socket timeout here means the PING waited behind them
                assert (h.request_id, h.status) == (7, P.Status.OK)
                key, frame = frames[1]
                sock.sendall(request(P.Op.PUT, 8, key + frame, key_count=1) + request(P.Op.GET, 9, key, key_count=1))
                assert read_reply(sock)[0].status == P.Status.OK
                h, body = read_reply(sock)
                assert h.status == P.Status.OK and body == frame
            growth = srv.rss() - rss_before
            assert growth < 64 * MiB, f"server RSS grew by {growth / MiB:.0f} MiB for bodies never sent"
        finally:
            for sock in stalled:
                sock.close()


def test_client_stalling_mid_body_is_closed_without_stray_errors(tmp_path: Path) -> None:
    (key, _frame), = make_frames(1, seed=22)
    env = {"KVTIER_SERVER__READ_TIMEOUT_S": "1"}
    srv = ServerProcess(tmp_path, env=env).start()
    try:
        for size in (2 * MiB, 64 * 1024):  # the worker-thread path and the event-loop path
            with srv.connect() as sock:
                sock.sendall(put_header(1, key, size) + bytes(size // 3))
                sock.settimeout(10)
                try:
                    h, _body = read_reply(sock)  # or the server just closes
                    assert h.status != P.Status.OK
                except (TimeoutError, ConnectionError):
                    pass
        with srv.connect() as sock:  # still serving
            sock.sendall(request(P.Op.PING, 3))
            assert read_reply(sock)[0].status == P.Status.OK
        assert srv.terminate() == 0
        log = srv.log.read_text()
        assert "exception was never retrieved" not in log, log
        assert "Traceback" not in log, log
    finally:
        srv.kill()


def test_unauthenticated_connection_is_closed_at_its_deadline_even_while_pinging(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, token="right") as srv, srv.connect() as sock:  # default auth_timeout_s: 10 s
        start = time.monotonic()
        rid = 0
        closed = False
        while time.monotonic() - start < 40 and not closed:
            rid += 1
            try:
                sock.sendall(request(P.Op.PING, rid))
                read_reply(sock)
                time.sleep(0.2)
            except OSError:  # ConnectionError included
                closed = True
        assert closed, "PINGs kept an unauthenticated connection open for 40 s"


def test_stalled_bodies_do_not_occupy_the_io_threads(tmp_path: Path) -> None:
    (key, frame), = make_frames(1, spec=BIG, seed=23)  # ~2 MiB: moved by the I/O threads both ways
    (key2, frame2), = make_frames(1, spec=BIG, seed=24)
    with ServerProcess(tmp_path, env={"KVTIER_SERVER__IO_THREADS": "2"}) as srv:
        with srv.connect() as sock:
            sock.sendall(request(P.Op.PUT, 1, key + frame, key_count=1))
            assert read_reply(sock)[0].status == P.Status.OK
        stalled = []
        for _ in range(6):  # each starts a 1 MiB body, sends 4 KiB of it, then nothing (read timeout: 30 s)
            sock = srv.connect()
            sock.sendall(put_header(1, key2, MiB) + bytes(4096))
            stalled.append(sock)
        try:
            time.sleep(1.0)
            with srv.connect(timeout_s=10.0) as sock:  # a socket timeout here: it waited for a thread
                sock.sendall(request(P.Op.GET, 2, key, key_count=1))
                h, body = read_reply(sock)
                assert h.status == P.Status.OK and body == frame
                sock.sendall(request(P.Op.PUT, 3, key2 + frame2, key_count=1))
                assert read_reply(sock)[0].status == P.Status.OK
        finally:
            for sock in stalled:
                sock.close()
