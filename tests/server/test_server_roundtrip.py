"""Commands, pipelining, auth and limits against a real ``kvtier server`` process."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import (
    ServerProcess,
    hello,
    make_frames,
    read_reply,
    read_until_closed,
    request,
    stats_of,
)

from kvtier import wire
from kvtier.errors import TierUnavailable
from kvtier.layout import KVSpec
from kvtier.procs import ChildExited
from kvtier.storage import remote_protocol as P
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"KVTIER_SERVER__MAX_MESSAGE_BYTES": "1MiB", "KVTIER_SERVER__MAX_CONNECTIONS": "16"}
    with ServerProcess(tmp_path_factory.mktemp("server"), env=env) as srv:
        yield srv


@pytest.fixture
def tier(server: ServerProcess) -> Iterator[RemoteTier]:
    t = RemoteTier("127.0.0.1", server.port, timeout_s=5.0, pool_size=2)
    t.clear()
    yield t
    t.close()


def test_put_get_exists_delete_list_stats(tier: RemoteTier) -> None:
    frames = make_frames(10)
    for key, frame in frames:
        tier.put(key, frame)
    for key, frame in frames:
        assert tier.get(key) == frame
    missing = b"\x00" * 16
    assert tier.get(missing) is None
    keys = [k for k, _f in frames]
    assert tier.exists([*keys, missing]) == [True] * 10 + [False]
    assert tier.list_keys() == sorted(keys)
    assert tier.list_keys(page=3) == sorted(keys)  # paginated with the cursor
    assert tier.delete(keys[0]) is True
    assert tier.delete(keys[0]) is False
    assert tier.exists(keys[:2]) == [False, True]
    stats = tier.server_stats()
    assert stats["store_chunks_memory"] == 9
    assert stats["op_put"] >= 10 and stats["op_get"] >= 11
    assert tier.clear() == 9
    assert tier.list_keys() == []
    assert tier.ping() < 1.0


def test_put_parts_and_overwrite(tier: RemoteTier) -> None:
    (key, frame), (_k2, frame2) = make_frames(2)
    tier.put_parts(key, (frame[:100], memoryview(frame)[100:]))
    assert tier.get(key) == frame
    tier.put(key, frame)  # overwrite with the same frame is fine
    assert tier.get(key) == frame
    tier.put(key, frame2)  # a frame naming another key is refused, the old one stays
    assert tier.get(key) == frame
    assert tier.stats()["puts_refused"] == 1


def test_malformed_put_refused_damaged_payload_kept_and_connection_survives(server: ServerProcess) -> None:
    """The server checks a frame's structure (here: the key it names), not its payload checksum: a frame
    with a damaged payload is stored as given (its readers verify it; see
    tests/storage/test_remote_integrity.py)."""
    (key, frame), (other, _f) = make_frames(2, seed=11)
    bad = bytearray(frame)
    bad[-3] ^= 0xFF
    refused = stats_of(server).get("refused_corrupt", 0)
    with server.connect() as sock:
        sock.sendall(hello() + request(P.Op.PUT, 2, other + frame, key_count=1)
                     + request(P.Op.GET, 3, other, key_count=1) + request(P.Op.PUT, 4, key + bytes(bad), key_count=1)
                     + request(P.Op.GET, 5, key, key_count=1) + request(P.Op.PING, 6))
        assert read_reply(sock)[0].status == P.Status.OK
        h, body = read_reply(sock)
        assert (h.request_id, h.status) == (2, P.Status.CORRUPT) and b"frame holds key" in body
        assert read_reply(sock)[0].status == P.Status.NOT_FOUND
        assert read_reply(sock)[0].status == P.Status.OK
        h, body = read_reply(sock)
        assert (h.request_id, h.status, bytes(body)) == (5, P.Status.OK, bytes(bad))
        assert read_reply(sock)[0].status == P.Status.OK
    assert stats_of(server)["refused_corrupt"] == refused + 1


def test_pipelined_requests_answer_in_order(server: ServerProcess, tier: RemoteTier) -> None:
    frames = make_frames(50, seed=3)
    stream = bytearray(hello())
    rid = 1
    expected: list[tuple[int, int, int]] = []
    for key, frame in frames:
        rid += 1
        stream += request(P.Op.PUT, rid, key + frame, key_count=1)
        expected.append((rid, P.Op.PUT, P.Status.OK))
        rid += 1
        stream += request(P.Op.GET, rid, key, key_count=1)
        expected.append((rid, P.Op.GET, P.Status.OK))
    rid += 1
    stream += request(P.Op.EXISTS, rid, b"".join(k for k, _ in frames) + b"\x01" * 16, key_count=51)
    expected.append((rid, P.Op.EXISTS, P.Status.OK))
    with server.connect() as sock:
        sock.sendall(stream)  # everything before reading anything
        read_reply(sock)
        got = {}
        for want_rid, want_op, want_status in expected:
            h, body = read_reply(sock)
            assert (h.request_id, h.opcode, h.status) == (want_rid, want_op, want_status)
            got[want_rid] = body
    gets = [got[r] for r, op, _s in expected if op == P.Op.GET]
    assert gets == [f for _k, f in frames]
    assert got[rid] == b"\x01" * 50 + b"\x00"
    # the client's batched MPUT / MGET
    tier.clear()
    tier.put_many([(k, (f[:100], memoryview(f)[100:])) for k, f in frames])
    assert tier.stats()["puts"] == 50 and not tier.stats().get("puts_refused")
    assert tier.get_many([k for k, _ in frames] + [b"\x01" * 16]) == [f for _k, f in frames] + [None]


def test_oversize_frame_refused_before_its_body(server: ServerProcess, tier: RemoteTier) -> None:
    with server.connect() as sock:
        sock.sendall(hello())
        read_reply(sock)
        sock.sendall(P.pack_header(P.Op.PUT, 9, key_count=1, body_len=(1 << 20) + 1))  # no body sent
        h, body = read_reply(sock)
        assert (h.request_id, h.status) == (9, P.Status.TOO_LARGE) and b"exceeds" in body
        assert read_until_closed(sock, 5.0) == b""
    with server.connect() as sock:  # absurd lengths too, before authentication
        sock.sendall(P.pack_header(P.Op.GET, 1, key_count=1, body_len=(1 << 64) - 1))
        assert read_reply(sock)[0].status == P.Status.BAD_REQUEST  # key count vs length
    with server.connect() as sock:
        sock.sendall(P.pack_header(P.Op.PUT, 2, key_count=1, body_len=(1 << 64) - 1))
        assert read_reply(sock)[0].status == P.Status.TOO_LARGE
    big = make_frames(1, spec=KVSpec(64, 8, 64, "float32", 16))[0]
    assert len(big[1]) > (1 << 20)
    tier.put(*big)  # refused locally (counted), never raised
    assert tier.stats()["puts_refused"] >= 1
    assert tier.ping() < 1.0


def test_malformed_header_closes_only_that_connection(server: ServerProcess, tier: RemoteTier) -> None:
    keep = server.connect()
    keep.sendall(hello())
    read_reply(keep)
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_until_closed(sock, 5.0)
        assert P.unpack_header(data[: P.HEADER_BYTES]).status == P.Status.BAD_REQUEST
    keep.sendall(request(P.Op.PING, 5))
    assert read_reply(keep)[0].status == P.Status.OK
    keep.close()


def test_connection_limit(server: ServerProcess) -> None:
    socks = []
    try:
        for _ in range(16):
            s = server.connect()
            s.sendall(request(P.Op.PING, 1))
            read_reply(s)
            socks.append(s)
        extra = server.connect()
        data = read_until_closed(extra, 5.0)
        assert P.unpack_header(data[: P.HEADER_BYTES]).status == P.Status.BUSY
        extra.close()
    finally:
        for s in socks:
            s.close()


def test_non_loopback_bind_without_token_refused(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, host="0.0.0.0")
    with pytest.raises(ChildExited, match="exit code 2"):
        srv.start()
    assert "server.token" in srv.log.read_text()


def test_token_required_and_checked(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, host="0.0.0.0", token="s3cret-token") as srv:
        good = RemoteTier("127.0.0.1", srv.port, "s3cret-token", timeout_s=5.0)
        (key, frame), = make_frames(1)
        good.put(key, frame)
        assert good.get(key) == frame
        for wrong in ("", "s3cret-tokeN", "x" * 1000):
            bad = RemoteTier("127.0.0.1", srv.port, wrong, timeout_s=5.0)
            with pytest.raises(TierUnavailable, match="token"):
                bad.get(key)
            bad.close()
        with srv.connect() as sock:  # no HELLO at all: only PING is allowed
            sock.sendall(request(P.Op.PING, 1) + request(P.Op.GET, 2, key, key_count=1))
            assert read_reply(sock)[0].status == P.Status.OK
            assert read_reply(sock)[0].status == P.Status.AUTH_REQUIRED
            assert read_until_closed(sock, 5.0) == b""
        with srv.connect() as sock:  # pre-auth bodies are capped small
            sock.sendall(P.pack_header(P.Op.HELLO, 1, body_len=P.PRE_AUTH_MAX_BODY + 1))
            assert read_reply(sock)[0].status == P.Status.TOO_LARGE
        stats = stats_of(srv)
        assert stats["auth_failures"] == 3
        good.close()


def test_kvtier_cli_entry_point(tmp_path: Path) -> None:
    exe = shutil.which("kvtier", path=str(Path(sys.executable).parent))
    assert exe is not None
    with ServerProcess(tmp_path, command=[exe, "server"], capacity="1MiB") as srv:
        with srv.connect() as sock:
            sock.sendall(request(P.Op.PING, 1))
            assert read_reply(sock)[0].status == P.Status.OK
        assert srv.terminate() == 0
    from typer.testing import CliRunner

    from kvtier.cli import app

    out = CliRunner().invoke(app, ["server", "--help"])
    assert out.exit_code == 0 and "--persist" in out.stdout and "--token" in out.stdout


def test_mget_streams_one_reply_per_key_in_order(server: ServerProcess, tier: RemoteTier) -> None:
    frames = make_frames(3, seed=41)
    for key, frame in frames:
        tier.put(key, frame)
    absent = b"\x07" * 16
    keys = [frames[0][0], absent, frames[1][0], frames[2][0]]
    with server.connect() as sock:
        sock.sendall(hello() + request(P.Op.MGET, 5, b"".join(keys), key_count=4) + request(P.Op.PING, 6))
        read_reply(sock)
        replies = [read_reply(sock) for _ in keys]
        assert [(h.request_id, h.opcode, h.key_count, h.flags) for h, _b in replies] == [
            (5, P.Op.MGET, i, P.FLAG_MORE if i < 3 else 0) for i in range(4)]
        assert [h.status for h, _b in replies] == [P.Status.OK, P.Status.NOT_FOUND, P.Status.OK, P.Status.OK]
        assert [b for _h, b in replies] == [frames[0][1], b"", frames[1][1], frames[2][1]]
        assert read_reply(sock)[0].request_id == 6  # the next request's reply follows the last item


@pytest.mark.parametrize("spec", [None, KVSpec(8, 4, 64, "float32", 16)], ids=["item by item", "one thread pass"])
def test_mput_answers_each_item_and_keeps_the_connection(server: ServerProcess, tier: RemoteTier,
                                                         spec: KVSpec | None) -> None:
    """Small bodies go item by item through the event loop, large ones (256 KiB frames) through one I/O
    thread pass (kvtier.server.mput): the same answers either way."""
    frames = make_frames(3, seed=42) if spec is None else make_frames(3, spec, seed=42)
    items = [frames[0], (frames[1][0], frames[2][1]), frames[2]]  # item 1's frame names another key
    body = b"".join(P.MPUT_ITEM.pack(k, len(f)) + f for k, f in items)
    one_pass = stats_of(server).get("mput_one_pass", 0)
    with server.connect() as sock:
        sock.sendall(hello() + request(P.Op.MPUT, 2, body, key_count=3) + request(P.Op.PING, 3))
        read_reply(sock)
        h, statuses = read_reply(sock)
        assert h.status == P.Status.OK and list(statuses) == [P.Status.OK, P.Status.CORRUPT, P.Status.OK]
        assert read_reply(sock)[0].request_id == 3
    assert tier.exists([k for k, _f in frames]) == [True, False, True]
    assert stats_of(server).get("mput_one_pass", 0) == one_pass + (spec is not None)
    lying = P.MPUT_ITEM.pack(frames[0][0], len(body)) + frames[0][1]  # announces more than the body holds
    with server.connect() as sock:
        sock.sendall(hello() + request(P.Op.MPUT, 2, lying, key_count=1))
        read_reply(sock)
        assert P.unpack_header(read_until_closed(sock, 10)[: P.HEADER_BYTES]).status == P.Status.BAD_REQUEST


def test_mput_resumes_after_the_client_stalls_mid_frame(server: ServerProcess, tier: RemoteTier) -> None:
    """The I/O thread gives the connection back to the event loop while the client is silent, then
    finishes the same body when the rest arrives; the request after it is answered too."""
    frames = make_frames(3, KVSpec(8, 4, 64, "float32", 16), seed=44)
    body = b"".join(P.MPUT_ITEM.pack(k, len(f)) + f for k, f in frames)
    message = request(P.Op.MPUT, 2, body, key_count=3)
    cut = len(message) // 2
    with server.connect() as sock:
        sock.sendall(hello() + message[:cut])
        time.sleep(1.0)  # several of the server's stall periods
        sock.sendall(message[cut:] + request(P.Op.PING, 3))
        read_reply(sock)
        h, statuses = read_reply(sock)
        assert (h.request_id, h.status, list(statuses)) == (2, P.Status.OK, [P.Status.OK] * 3)
        assert read_reply(sock)[0].request_id == 3
    assert tier.get_many([k for k, _f in frames]) == [f for _k, f in frames]
    assert stats_of(server)["mput_one_pass"] >= 1


def test_put_many_cuts_messages_at_the_server_limit(server: ServerProcess, tier: RemoteTier) -> None:
    """Eight 256 KiB frames against a 1 MiB message limit: three MPUTs of whole frames, each received
    in one pass, instead of one message the server must take item by item."""
    frames = make_frames(8, KVSpec(8, 4, 64, "float32", 16), seed=45)
    before = stats_of(server)
    tier.put_many([(k, (f,)) for k, f in frames])
    after = stats_of(server)
    assert after["op_mput"] - before.get("op_mput", 0) == 3
    assert after["mput_one_pass"] - before.get("mput_one_pass", 0) == 3
    assert tier.get_many([k for k, _f in frames]) == [f for _k, f in frames]


def test_get_many_into_receives_payloads_in_place(tier: RemoteTier) -> None:
    frames = make_frames(3, seed=43)
    tier.put_many([(k, (f,)) for k, f in frames])
    head_len = len(frames[0][1]) - wire.read_header(frames[0][1]).payload_len
    dests = [memoryview(bytearray(len(f) - head_len)) for _k, f in frames]
    wrong = memoryview(bytearray(7))  # a size mismatch: a miss, the buffer untouched, the stream in step
    heads = tier.get_many_into([frames[0][0], b"\x09" * 16, frames[1][0], frames[2][0]],
                               [dests[0], memoryview(bytearray(len(dests[0]))), wrong, dests[2]])
    assert heads[1] is None and heads[2] is None and bytes(wrong) == bytes(7)
    for i in (0, 2):
        _key, frame = frames[i]
        assert heads[0 if i == 0 else 3] == frame[:head_len] and bytes(dests[i]) == frame[head_len:]
    assert tier.get_into(frames[1][0], dests[1]) == frames[1][1][:head_len]
    assert bytes(dests[1]) == frames[1][1][head_len:]
