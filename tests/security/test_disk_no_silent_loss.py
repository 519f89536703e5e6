"""Disk tier against hostile or unlucky input: an oversize chunk must not cost the chunks already
stored, and a non-regular file named like a chunk must not hang a tier's start or a read."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from server_attack import make_frames

from kvtier.layout import KVSpec
from kvtier.storage.disk import DiskTier, chunk_path

BIG = KVSpec(num_layers=8, num_kv_heads=8, head_dim=64, dtype="float32", chunk_tokens=64)  # ~2 MiB frames


def test_oversize_chunk_is_refused_before_anything_is_evicted(tmp_path: Path) -> None:
    small = make_frames(8, seed=1)
    (big_key, big_frame), = make_frames(1, spec=BIG, seed=2)
    cap = 1 << 20
    assert len(big_frame) > cap > sum(len(f) for _k, f in small)
    tier = DiskTier(tmp_path, cap, fsync=False)
    for key, frame in small:
        tier.put(key, frame)
    tier.put(big_key, big_frame)  # cannot fit: dropped (the Tier API does not raise for it)
    assert tier.stats()["evictions"] == 0
    assert not tier.write(big_key, (big_frame,))  # the server's path: refused, and says so
    assert tier.stats()["dropped_no_space"] == 2
    tier.close()
    again = DiskTier(tmp_path, cap, fsync=False)  # after a restart too
    try:
        assert again.exists([k for k, _f in small]) == [True] * len(small)
        assert [again.get(k) for k, _f in small] == [f for _k, f in small]
        assert again.get(big_key) is None
    finally:
        again.close()


def test_chunk_larger_than_room_left_by_writes_in_flight_evicts_nothing(tmp_path: Path) -> None:
    frames = make_frames(4, seed=3)
    size = len(frames[0][1])
    tier = DiskTier(tmp_path, 3 * size, fsync=False)
    try:
        for key, frame in frames[:2]:
            tier.put(key, frame)
        tier._pending = 2 * size + 1  # two writes of other threads in flight (white-box: a race made still)
        tier.put(*frames[2])
        assert tier.exists([k for k, _f in frames[:2]]) == [True, True]
        assert tier.stats()["evictions"] == 0
    finally:
        tier._pending = 0
        tier.close()


def _run(code: str, timeout_s: float = 60) -> str:
    """Run ``code`` in a fresh interpreter; a hang is a test failure, not a hung test session."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fifo_named_like_a_chunk_neither_hangs_start_nor_reads(tmp_path: Path) -> None:
    frames = make_frames(3, seed=4)
    tier = DiskTier(tmp_path, 1 << 30, fsync=False)
    for key, frame in frames:
        tier.put(key, frame)
    tier.close()
    fifo_key = bytes(range(16))
    path = chunk_path(tmp_path, fifo_key)
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    out = _run(f"""
        from kvtier.storage.disk import DiskTier
        tier = DiskTier({str(tmp_path)!r}, 1 << 30, fsync=False)
        print(len(tier), tier.stats()["skipped_not_regular"], tier.get({fifo_key!r}))
    """)
    assert out.split() == ["3", "1", "None"]
    assert path.exists()  # left alone: not ours to delete
    out = _run(f"""
        from pathlib import Path
        from kvtier.storage.inspect import scan_dir
        report = scan_dir(Path({str(tmp_path)!r}), progress=False)
        print(report.chunks, report.other, len(report.corrupt))
    """)
    assert out.split() == ["3", "1", "0"]  # `kvtier inspect` does not hang on it either


def test_fifo_swapped_in_after_indexing_is_a_counted_miss(tmp_path: Path) -> None:
    (key, frame), = make_frames(1, seed=5)
    tier = DiskTier(tmp_path, 1 << 30, fsync=False)
    tier.put(key, frame)
    tier.close()
    path = chunk_path(tmp_path, key)
    out = _run(f"""
        import os
        from kvtier.storage.disk import DiskTier
        tier = DiskTier({str(tmp_path)!r}, 1 << 30, fsync=False)
        os.unlink({str(path)!r}); os.mkfifo({str(path)!r})
        print(tier.get({key!r}), tier.exists([{key!r}])[0], tier.stats()["skipped_not_regular"], len(tier))
    """)
    assert out.split() == ["None", "False", "1", "0"]


def test_shared_fs_tier_reads_of_a_fifo_are_misses(tmp_path: Path) -> None:
    key = bytes(range(16))
    path = chunk_path(tmp_path, key)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    out = _run(f"""
        from kvtier.storage.fs import FsTier
        tier = FsTier({str(tmp_path)!r}, fsync=False)
        into = memoryview(bytearray(16))
        print(tier.exists([{key!r}]), tier.get({key!r}), tier.get_into({key!r}, into),
              tier.stats()["skipped_not_regular"])
    """)
    assert out.split() == ["[False]", "None", "None", "1"]


def test_symlink_to_a_fifo_named_like_a_chunk_is_skipped(tmp_path: Path) -> None:
    (key, frame), = make_frames(1, seed=6)
    tier_dir = tmp_path / "tier"
    tier = DiskTier(tier_dir, 1 << 30, fsync=False)
    tier.put(key, frame)
    tier.close()
    os.mkfifo(tmp_path / "fifo")
    planted = bytes(range(1, 17))
    chunk_path(tier_dir, planted).parent.mkdir(exist_ok=True)
    os.symlink(tmp_path / "fifo", chunk_path(tier_dir, planted))
    out = _run(f"""
        from kvtier.storage.disk import DiskTier
        tier = DiskTier({str(tier_dir)!r}, 1 << 30, fsync=False)
        print(len(tier), tier.stats()["skipped_not_regular"], tier.get({planted!r}), tier.get({key!r}) is not None)
    """)
    assert out.split() == ["1", "1", "None", "True"]
