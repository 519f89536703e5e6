"""DiskTier on real files: round trips, restart, damage, kill -9 mid-write, disk full, capacity, threads."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from storage_support import tmpfs

from kvtier import wire
from kvtier.errors import CorruptChunk, TierUnavailable
from kvtier.frames import pack, payload_view, unpack_head_into, unpack_into
from kvtier.keys import Chunk, Chunker, Namespace
from kvtier.layout import KVSpec
from kvtier.procs import Child, ChildExited
from kvtier.record import token_record
from kvtier.storage import disk
from kvtier.storage.disk import QUARANTINE, DiskTier, chunk_path

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)


def frames(n: int, spec: KVSpec = SPEC, seed: int = 0) -> list[tuple[Chunk, bytes, torch.Tensor]]:
    """``n`` distinct chunks of one sequence with their frames and tensors."""
    arr, chunks = Chunker(Namespace("test", spec)).chunks(np.arange(n * spec.chunk_tokens) + seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in chunks:
        kv = torch.randn(spec.chunk_shape(c.num_tokens), generator=g)
        out.append((c, pack(token_record(c, arr), kv, spec), kv))
    return out


def written(root: Path, items: list[tuple[Chunk, bytes, torch.Tensor]]) -> None:
    """Put ``items`` into a disk tier at ``root`` and close it (as a process that stopped would)."""
    t = DiskTier(root, 1 << 30)
    for c, f, _ in items:
        t.put(c.key, f)
    t.close()


def view_of(t: torch.Tensor) -> memoryview:
    view = payload_view(t)
    assert view is not None
    return view


def decode(frame: bytes, chunk: Chunk, spec: KVSpec = SPEC) -> torch.Tensor:
    out = torch.empty(spec.chunk_shape(chunk.num_tokens), dtype=spec.torch_dtype)
    unpack_into(frame, spec, out, expect=chunk.key)
    return out


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[DiskTier]:
    t = DiskTier(tmp_path / "disk", 1 << 30)
    yield t
    t.close()


def test_round_trip_exact(tier: DiskTier) -> None:
    items = frames(6)
    for i, (c, f, _kv) in enumerate(items):
        if i % 2:
            tier.put(c.key, f)
        else:  # the manager's path: header+meta and a payload view, written with writev
            tier.put_parts(c.key, (f[:100], memoryview(f)[100:]))
    assert tier.exists([c.key for c, _, _ in items] + [b"\0" * 16]) == [True] * 6 + [False]
    for c, f, kv in items:
        got = tier.get(c.key)
        assert got == f
        assert torch.equal(decode(got, c), kv)
    assert tier.stats()["chunks"] == 6 and tier.stats()["bytes"] == sum(len(f) for _, f, _ in items)
    assert tier.delete(items[0][0].key) and not tier.delete(items[0][0].key)
    assert tier.get(items[0][0].key) is None
    assert tier.clear() == 5 and tier.stats()["chunks"] == 0 and tier.stats()["bytes"] == 0
    assert not list((tier.root).glob("*/*.kvt"))


def test_restart_finds_every_chunk_and_removes_stale_temps(tmp_path: Path) -> None:
    items = frames(20)
    written(tmp_path, items)
    stale = chunk_path(tmp_path, items[0][0].key).with_name(".leftover.123.0.tmp")
    stale.write_bytes(b"half a frame")
    seen: list[tuple[int, int]] = []
    t2 = DiskTier(tmp_path, 1 << 30, progress=lambda done, total: seen.append((done, total)))
    try:
        assert not stale.exists() and t2.stats()["stale_temp_removed"] == 1
        assert seen[-1][0] == seen[-1][1] == 21
        assert t2.exists([c.key for c, _, _ in items]) == [True] * 20
        for c, f, _ in items:
            assert t2.get(c.key) == f
        assert t2.used_bytes == sum(len(f) for _, f, _ in items)
    finally:
        t2.close()


def test_get_and_zero_copy_get_into_are_exact(tier: DiskTier) -> None:
    items = frames(6)
    for c, f, _ in items:
        tier.put(c.key, f)
    assert all(tier.exists([c.key for c, _, _ in items]))  # plans read-ahead in this order
    for c, f, kv in items:
        assert tier.get(c.key) == f
        out = torch.empty_like(kv)
        head = tier.get_into(c.key, view_of(out))  # payload lands straight in ``out``
        assert head is not None and bytes(head) == f[: len(head)]
        unpack_head_into(head, SPEC, out, expect=c.key)
        assert torch.equal(out, kv)
    assert tier.stats()["gets_zero_copy"] == 6
    c, f, kv = items[0]
    too_small = torch.empty(SPEC.chunk_shape(c.num_tokens - 1))
    assert tier.get_into(c.key, view_of(too_small)) is None  # sizes differ: caller falls back
    assert tier.get_into(b"\1" * 16, view_of(kv.clone())) is None
    out = torch.empty_like(kv)
    head = tier.get_into(c.key, view_of(out))
    assert head is not None
    out.view(-1)[3] += 1  # damage in the payload is caught by the checksum over it
    with pytest.raises(CorruptChunk, match="checksum"):
        unpack_head_into(head, SPEC, out, expect=c.key)


def test_second_owner_of_a_directory_is_refused(tmp_path: Path) -> None:
    t = DiskTier(tmp_path, 1 << 20)
    with pytest.raises(TierUnavailable, match="locked"):
        DiskTier(tmp_path, 1 << 20)
    t.close()
    DiskTier(tmp_path, 1 << 20).close()


def test_flipped_byte_is_returned_only_to_be_caught_and_quarantined(tier: DiskTier) -> None:
    (c, f, _kv), (c2, f2, _) = frames(2)
    tier.put(c.key, f)
    tier.put(c2.key, f2)
    path = chunk_path(tier.root, c.key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    got = tier.get(c.key)  # the tier hands out files; verification is the reader's job (manager)
    assert got is not None
    with pytest.raises(CorruptChunk, match="checksum"):
        wire.unpack_meta(got)
    tier.discard(c.key)
    assert tier.get(c.key) is None and tier.exists([c.key]) == [False]
    assert not path.exists() and len(list((tier.root / QUARANTINE).iterdir())) == 1
    assert tier.stats()["quarantined"] == 1
    assert tier.get(c2.key) == f2


def test_truncated_file_is_a_counted_miss(tier: DiskTier) -> None:
    (c, f, _), = frames(1)
    tier.put(c.key, f)
    path = chunk_path(tier.root, c.key)
    os.truncate(path, len(f) - 7)
    assert tier.get(c.key) is None
    assert tier.exists([c.key]) == [False]
    assert tier.stats()["quarantined"] == 1 and not path.exists()


def test_damaged_files_are_quarantined_at_start(tmp_path: Path) -> None:
    items = frames(4)
    written(tmp_path, items)
    os.truncate(chunk_path(tmp_path, items[0][0].key), 10)  # head unreadable
    os.truncate(chunk_path(tmp_path, items[1][0].key), len(items[1][1]) - 1)  # payload short
    os.replace(chunk_path(tmp_path, items[2][0].key), chunk_path(tmp_path, items[3][0].key))  # wrong key
    t2 = DiskTier(tmp_path, 1 << 30)
    try:
        assert t2.stats()["chunks"] == 0 and t2.stats()["quarantined"] == 3
        assert len(list((tmp_path / QUARANTINE).iterdir())) == 3
    finally:
        t2.close()


def test_capacity_eviction_lru(tmp_path: Path) -> None:
    items = frames(8)
    size = len(items[0][1])
    t = DiskTier(tmp_path, 5 * size, policy="lru")
    try:
        for c, f, _ in items[:5]:
            t.put(c.key, f)
        assert t.get(items[0][0].key) is not None  # touch: 0 is now most recent
        for c, f, _ in items[5:]:
            t.put(c.key, f)
        present = t.exists([c.key for c, _, _ in items])
        assert present == [True, False, False, False, True, True, True, True]
        s = t.stats()
        assert s["evictions"] == 3 and s["chunks"] == 5 and s["bytes"] <= 5 * size
        assert len(list(tmp_path.glob("*/*.kvt"))) == 5  # evicted files are really gone
        big = frames(1, KVSpec(2, 2, 8, "float32", 128))[0]
        t.put(big[0].key, big[1])  # larger than the whole cap: dropped and counted
        assert t.stats()["dropped_no_space"] == 1 and not t.exists([big[0].key])[0]
    finally:
        t.close()


def test_concurrent_threads_respect_cap_and_never_see_partial_frames(tmp_path: Path) -> None:
    items = frames(24)
    size = len(items[0][1])
    t = DiskTier(tmp_path, 10 * size, fsync=False)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(150):
                c, f, _ = items[(i * 7 + offset) % len(items)]
                if i % 3:
                    t.put(c.key, f)
                got = t.get(c.key)
                assert got is None or got == f
                assert t.used_bytes <= 10 * size
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors
        assert t.stats()["chunks"] <= 10 and t.used_bytes <= 10 * size
        on_disk = {p.name for p in tmp_path.glob("*/*.kvt")}
        assert on_disk == {chunk_path(tmp_path, k).name for k in t.keys()}  # noqa: SIM118 - DiskTier.keys(), not a dict
        assert not list(tmp_path.glob("*/*.tmp"))
    finally:
        t.close()


# ---- kill -9 mid-write -----------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from kvtier.frames import pack, payload_view, unpack_head_into, unpack_into
    from kvtier.record import token_record
    from kvtier.keys import Chunker, Namespace
    from kvtier.layout import KVSpec
    from kvtier.storage.disk import DiskTier
    spec = KVSpec(4, 8, 64, "float32", 256)  # 4 MiB chunks: a write takes long enough to be caught
    arr, chunks = Chunker(Namespace("kill", spec)).chunks(np.arange(200 * 256))
    tier = DiskTier(sys.argv[1], 1 << 40)
    kv = torch.randn(spec.chunk_shape())
    for c in chunks:
        kv[0, 0, 0, 0, 0] = c.start
        frame = pack(token_record(c, arr), kv, spec)
        print("start", c.key.hex(), flush=True)
        tier.put(c.key, frame)
        print("done", c.key.hex(), flush=True)
    """
)
KILL_SPEC = KVSpec(4, 8, 64, "float32", 256)


def _kill_mid_write(root: Path) -> tuple[bool, list[str]]:
    """Run the writer and SIGKILL it between creating a chunk's temp file and renaming it; returns
    (caught mid-write, keys the writer reported done). A fast disk can finish every write before the
    poll sees a temp file: then the writer exits and the caller tries again."""
    done: list[str] = []
    with Child([sys.executable, "-c", WRITER, str(root)], log=root.with_suffix(".log")) as writer:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                what, key = writer.expect(r"^(start|done) ", deadline - time.monotonic()).string.split()
            except ChildExited:  # it wrote every chunk
                return False, done
            if what == "done":
                done.append(key)
                continue
            if len(done) < 3:
                continue
            # the writer is inside put(key): kill it as soon as its temp file exists
            sub = root / key[:2]
            for _ in range(200):
                if list(sub.glob(f".{key}.*.tmp")):
                    os.kill(writer.pid, signal.SIGKILL)
                    if not (sub / f"{key}.kvt").exists():
                        return True, done
                    break
                time.sleep(0.0005)
    return False, done


def test_kill_9_mid_write_leaves_no_partial_chunk(tmp_path: Path) -> None:
    for attempt in range(4):
        root = tmp_path / f"disk{attempt}"
        caught_mid_write, done = _kill_mid_write(root)
        if caught_mid_write:
            break
    assert caught_mid_write, "never caught the writer between creating its temp file and renaming it"
    assert list(root.glob("*/.*.tmp")), "the killed write left its temp file (a partial chunk)"
    for path in root.glob("*/*.kvt"):  # every visible chunk is complete
        wire.unpack_meta(path.read_bytes())
    t = DiskTier(root, 1 << 40)
    try:
        assert not list(root.glob("*/.*.tmp"))
        indexed = {k.hex() for k in t.keys()}  # noqa: SIM118 - DiskTier.keys(), not a dict
        assert set(done) <= indexed and len(indexed) <= len(done) + 1
        _, chunks = Chunker(Namespace("kill", KILL_SPEC)).chunks(np.arange(200 * 256))
        by_key = {c.key.hex(): c for c in chunks}
        for key in done:
            frame = t.get(bytes.fromhex(key))
            assert frame is not None
            assert decode(frame, by_key[key], KILL_SPEC)[0, 0, 0, 0, 0].item() == by_key[key].start
    finally:
        t.close()


# ---- disk full -------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test."""
    with tmpfs(tmp_path, "2m") as mnt:
        yield mnt


def test_disk_full_fails_cleanly_and_keeps_existing_data(small_fs: Path) -> None:
    spec = KVSpec(2, 4, 32, "float32", 256)  # 256 KiB chunks into a 2 MiB filesystem
    items = frames(12, spec)
    t = DiskTier(small_fs / "disk", 1 << 30)  # the cap is not what stops it: the filesystem is
    for c, f, _ in items:
        t.put(c.key, f)  # never raises for a full disk: counted, dropped
    s = t.stats()
    stored = [(c, f) for c, f, _ in items if t.exists([c.key])[0]]
    assert 0 < len(stored) < len(items) and s["chunks"] == len(stored)
    assert s["enospc"] == 1 and s["write_errors"] == 1  # then writes pause instead of hammering
    assert s["dropped_disk_full"] == len(items) - len(stored) - 1
    assert not list((small_fs / "disk").glob("*/.*.tmp"))  # the failed write cleaned up after itself
    for c, f in stored:
        assert t.get(c.key) == f
    t.close()
    t2 = DiskTier(small_fs / "disk", 1 << 30)
    try:
        assert sorted(t2.keys()) == sorted(c.key for c, _ in stored)
        t2.delete(stored[0][0].key)  # making room lets writes succeed again
        c, f, _ = items[-1]
        t2.put(c.key, f)
        assert t2.get(c.key) == f
    finally:
        t2.close()


def test_stats_are_json_numbers(tier: DiskTier) -> None:
    (c, f, _), = frames(1)
    tier.put(c.key, f)
    json.dumps(tier.stats())


def test_inspect_cli_reports_files_and_damage(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from kvtier.storage.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps "inspect" a subcommand
    items = frames(3)
    written(tmp_path, items)
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 0 and "chunk files" in res.output
    one = chunk_path(tmp_path, items[0][0].key)
    res = runner.invoke(app, ["inspect", str(one)])
    assert res.exit_code == 0 and items[0][0].key.hex() in res.output and "ok" in res.output
    data = bytearray(one.read_bytes())
    data[-1] ^= 0xFF
    one.write_bytes(data)
    res = runner.invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and "checksum mismatch" in res.output
    assert runner.invoke(app, ["inspect", str(one), "--no-verify"]).exit_code == 0


def test_private_directory_is_the_users_alone(tmp_path: Path) -> None:
    """A new tier directory is created 0700; any way another user could write into it makes it shared."""
    tier = DiskTier(tmp_path / "new" / "tier", 1 << 20)
    try:
        assert (tier.root.stat().st_mode & 0o777) == 0o700
        assert tier.private()
        tier.root.chmod(0o770)  # group-writable
        assert not tier.private()
        tier.root.chmod(0o700)
        if os.geteuid() == 0:  # only root can hand a directory to another user
            os.chown(tier.root, 65534, -1)
            assert not tier.private()
            os.chown(tier.root, 0, -1)
            assert tier.private()
    finally:
        tier.close()
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # another user could rename the tier directory away and put their own in place
    tier = DiskTier(parent / "tier", 1 << 20)
    try:
        assert not tier.private()
        parent.chmod(0o1777)  # sticky, like /tmp: only the owner may rename it
        assert tier.private()
    finally:
        tier.close()


def test_no_secret_warning_only_for_tiers_others_can_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from kvtier import frame_auth
    from kvtier.storage.manager import StorageManager

    def warned(path: Path) -> bool:
        monkeypatch.setattr(frame_auth, "_warned", set())
        caplog.clear()
        tier = DiskTier(path, 1 << 20)
        StorageManager(SPEC, [(tier, "raw")]).close()
        return any("no auth.secret" in r.getMessage() for r in caplog.records)

    caplog.set_level("WARNING", logger="kvtier.frame_auth")
    assert not warned(tmp_path / "private")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert warned(shared)


@pytest.mark.parametrize("make", ["disk", "fs"])
def test_put_many_syncs_files_at_once_and_returns_after_all(tmp_path: Path, make: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A syncing put_many overlaps the files' fsyncs (several are in flight together), returns only when
    every file is published, and a failed file fails the call after the others finished."""
    from kvtier.storage.fs import FsTier

    items = frames(8)
    tier = DiskTier(tmp_path, 1 << 30) if make == "disk" else FsTier(tmp_path)
    real_fsync = os.fsync
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most at once

    def slow_fsync(fd: int) -> None:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(0.02)
        real_fsync(fd)
        with lock:
            in_flight[0] -= 1

    monkeypatch.setattr(os, "fsync", slow_fsync)
    tier.put_many([(c.key, (f[:7], memoryview(f)[7:])) for c, f, _ in items])
    assert in_flight[1] > 1 and in_flight[0] == 0
    for c, f, _ in items:
        assert chunk_path(tmp_path, c.key).read_bytes() == f
    assert not list(tmp_path.rglob("*.tmp"))

    fresh = frames(4, seed=100)
    broken = fresh[2][0].key

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").find(broken.hex()) >= 0:
            raise OSError(5, "injected I/O error")
        slow_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TierUnavailable):
        tier.put_many([(c.key, (f,)) for c, f, _ in fresh])
    assert in_flight[0] == 0  # nothing still writing when the failure came back
    for c, f, _ in fresh:
        path = chunk_path(tmp_path, c.key)
        assert (not path.exists()) if c.key == broken else path.read_bytes() == f
    assert not list(tmp_path.rglob("*.tmp"))
    tier.close()


def test_frames_go_down_and_come_back_in_any_number_of_pieces(tier: DiskTier) -> None:
    """A frame written from many buffers (more than one ``writev`` takes) is the joined frame; a payload
    read into many buffers (more than one ``preadv`` fills) lands in them in order, and the frame
    verifies over those pieces (checksum streamed over them) as over the whole payload."""
    c, f, kv = frames(1)[0]
    head_len = len(f) - kv.numel() * kv.element_size()
    head, payload = f[:head_len], memoryview(f)[head_len:]
    step = 1  # bytes per piece: thousands of pieces
    assert len(payload) // step > 2 * disk.IOV_MAX
    tier.put_parts(c.key, [head, *(payload[i : i + step] for i in range(0, len(payload), step))])
    assert tier.get(c.key) == f
    out = bytearray(len(payload))
    pieces = [memoryview(out)[i : i + step] for i in range(0, len(out), step)]
    got = tier.get_into_parts(c.key, pieces)
    assert got is not None and bytes(got) == head and out == payload
    assert wire.verify_parts(got, pieces).key == c.key
    pieces[-1][0] ^= 1
    with pytest.raises(CorruptChunk, match="checksum"):
        wire.verify_parts(got, pieces)
    assert tier.get_into_parts(c.key, pieces[:-1]) is None  # pieces one short of the payload: caller falls back
