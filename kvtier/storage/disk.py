"""Local disk tier: one self-describing wire frame per file, published atomically.

Layout under ``path``::

    .lock                       flock held while a DiskTier has the directory open
    <hh>/<hex>.kvt              the frame of key <hex> (hh = its first two hex digits)
    <hh>/.<hex>.<pid>.<n>.tmp   a write in progress (removed at start: a crash left it)
    quarantine/<hex>.<ns>.kvt   frames that failed verification, kept for inspection

Invariants:
- A ``.kvt`` file only ever appears by ``rename`` of a fully written (and, with ``fsync``, synced) temp
  file, and the directory entry is synced before ``put`` returns, so after a crash every file is either
  absent or complete; ``put`` that returned is durable.
- The in-memory index (key -> file size) is rebuilt at start from the file heads
  (:func:`kvtier.wire.peek_meta`); a file whose head is unreadable, names another key or whose size
  disagrees with its header is quarantined instead of indexed.
- The sum of indexed sizes plus writes in flight never exceeds ``capacity_bytes``: space is reserved
  (evicting by policy) before a write starts and given back if the write fails. A chunk that cannot
  fit even in an empty tier (larger than ``capacity_bytes`` minus the writes in flight) is refused
  *before* anything is evicted, so one oversize put never costs the chunks already stored.
- Only regular files are ever opened (``O_NONBLOCK``, then ``fstat``): a FIFO, socket or device named
  like a chunk file is skipped and counted (``skipped_not_regular``), so it can neither hang a reader
  nor be served.
- A failed write removes its temp file and leaves every indexed file untouched. A full filesystem
  (``ENOSPC``/``EDQUOT``) is counted and the write dropped (writes pause for ``FULL_PAUSE_S``) without
  raising, so reads keep being served; any other I/O error raises ``TierUnavailable``.
- Reads never see a partial file: ``get`` returns fresh bytes, ``get_into`` puts the payload straight
  into the caller's memory (zero copy). A file whose size disagrees with the index is quarantined.
  After ``exists``, a ``get_into`` asks the kernel to start reading the next chunk listed
  (``POSIX_FADV_WILLNEED``, one chunk ahead).
- ``put_many`` with ``fsync`` writes up to :data:`SYNC_WRITERS` files at once (:class:`SyncedWrites`),
  each exactly as ``put`` does, and returns only when every one is done: one file's ``fsync`` waits
  while the others are written, instead of every write waiting for the previous sync.
- One process owns a directory at a time (``flock`` on ``.lock``); several processes sharing one
  directory use :class:`kvtier.storage.fs.FsTier` instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from kvtier import wire
from kvtier.errors import CorruptChunk, TierUnavailable
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.storage.base import ScatteredTier
from kvtier.storage.policy import make_policy

log = logging.getLogger(__name__)

SUFFIX = ".kvt"
TEMP_SUFFIX = ".tmp"
QUARANTINE = "quarantine"
Buffer = bytes | bytearray | memoryview
Progress = Callable[[int, int], None]
HEAD_GUESS = 4096  # first read of get_into: fixed header + metadata (~1.1 KiB for 256 tokens)
FULL_PAUSE_S = 1.0  # after ENOSPC, puts are dropped (counted) this long without touching the disk
# files a syncing put_many writes at once: one put_many of 189 MB in 32 files (ext4, 2-core VM) went
# from 0.65x to 1.54x of plain write + fsync per file (medians of 7 interleaved runs on a shared
# machine); the engine-level ratio is ``kvtier bench tiers --tier disk`` (store vs its write+fsync)
SYNC_WRITERS = 4


# ---- file helpers shared with FsTier and ``kvtier inspect`` -------------------------------------------
def chunk_path(root: Path, key: ChunkKey) -> Path:
    text = key.hex()
    return root / text[:2] / f"{text}{SUFFIX}"


def key_of(name: str) -> ChunkKey | None:
    """The key a published file name stands for, or ``None`` if it is not one."""
    stem, dot, ext = name.partition(".")
    if not dot or "." + ext != SUFFIX or len(stem) != 2 * KEY_BYTES:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


class NotRegularFile(OSError):
    """A chunk-file name that is a FIFO, socket, device or directory (never opened for reading)."""


def open_regular(path: Path) -> int:
    """``os.open`` for reading that never blocks on a FIFO or device: opened with ``O_NONBLOCK`` (and
    without following a final symlink), then checked to be a regular file, else :class:`NotRegularFile`.
    ``O_NONBLOCK`` does not change reads of regular files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink
            raise NotRegularFile(f"{path} is a symbolic link") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def iter_files(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every entry in the fan-out subdirectories of ``root`` (published and temp files)."""
    try:
        subdirs = [e for e in os.scandir(root) if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for sub in sorted(subdirs, key=lambda e: e.name):
        try:
            with os.scandir(sub.path) as it:
                yield from it
        except FileNotFoundError:
            continue


def read_head(fd: int) -> tuple[wire.ChunkMeta, int]:
    """Metadata and announced frame length of an open frame file, from its head only (usually one
    read); :class:`CorruptChunk` if the head is unreadable."""
    head = os.pread(fd, HEAD_GUESS, 0)
    header = wire.read_header(head)
    if len(head) < wire.HEADER_BYTES + header.meta_len:
        head += os.pread(fd, wire.HEADER_BYTES + header.meta_len - len(head), len(head))
    return wire.peek_meta(head), wire.HEADER_BYTES + header.meta_len + header.payload_len


def frame_length(head: Buffer) -> int:
    """Total frame length announced by a frame's fixed header."""
    header = wire.read_header(head)
    return wire.HEADER_BYTES + header.meta_len + header.payload_len


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers per writev / preadv


def write_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Write every byte of ``parts`` with ``writev`` (no join; at most ``IOV_MAX`` buffers a call),
    retrying short writes."""
    views = _byte_views(parts)
    total = 0
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        total += n
        wire.advance(views, n)
    return total


def _byte_views(parts: Sequence[Buffer]) -> list[memoryview]:
    return [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]


def read_exact(fd: int, size: int) -> bytes | None:
    """Read ``size`` bytes from the start of ``fd``; ``None`` if the file is shorter."""
    data = os.pread(fd, size, 0)
    if len(data) == size:
        return data
    out = bytearray(data)
    while len(out) < size:  # a short read: continue where it stopped
        more = os.pread(fd, size - len(out), len(out))
        if not more:
            return None
        out += more
    return bytes(out)


def read_frame_into(fd: int, size: int, payload: memoryview | Sequence[memoryview]) -> bytes | None:
    """Read the open frame file ``fd`` (expected ``size`` bytes) as head + payload, the payload straight
    into ``payload`` (one buffer, or several filled in order with ``preadv``: the frame's payload is
    their concatenation); return the head (header + metadata, unverified), or ``None`` if the file is
    not ``size`` bytes, its header is unreadable or its payload is not the buffers' total size."""
    views = _byte_views(wire.payload_parts(payload))
    head = os.pread(fd, HEAD_GUESS, 0)
    try:
        meta_len, payload_len = wire.read_header(head)[:2]
    except CorruptChunk:
        return None
    head_len = wire.HEADER_BYTES + meta_len
    if payload_len != sum(map(len, views)) or size != head_len + payload_len or os.fstat(fd).st_size != size:
        return None
    if len(head) < head_len:
        head += os.pread(fd, head_len - len(head), len(head))
    got = 0
    while views:
        n = os.preadv(fd, views[:IOV_MAX], head_len + got)
        if n == 0:
            return None
        got += n
        wire.advance(views, n)
    return head[:head_len]


def private_dir(path: Path) -> bool:
    """True if no user but this one (and root) can change what is under ``path``: the directory is owned
    by the effective user and writable by no one else, and no ancestor lets another user replace it
    (each is owned by this user or root and writable by no one else, unless sticky like ``/tmp``)."""
    uid = os.geteuid()
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
        if st.st_uid != uid or st.st_mode & 0o022:
            return False
        for parent in real.parents:
            st = os.stat(parent)
            if st.st_uid not in (uid, 0) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                return False
    except OSError:
        return False
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_temp_ids = itertools.count()


def temp_path(final: Path) -> Path:
    """A temp name next to ``final``, unique within this host (pid + counter)."""
    return final.with_name(f".{final.stem}.{os.getpid()}.{next(_temp_ids)}{TEMP_SUFFIX}")


def publish(final: Path, parts: Sequence[Buffer], *, fsync: bool, tmp: Path | None = None) -> int:
    """Write ``parts`` to a fresh temp file beside ``final`` (``tmp``, default :func:`temp_path`), sync
    it, rename it over ``final``. Does not sync the directory.

    Returns the bytes written. On any error the temp file is gone and ``final`` is as it was.
    """
    tmp = tmp or temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            size = write_all(fd, parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return size


class SyncedWrites:
    """Runs a syncing tier's puts of many files at once (the threads mostly wait in ``fsync``).

    Invariant: :meth:`run` returns (or raises the first failure) only after every put it started has
    finished, so the caller may reuse the parts' memory and every put that returned normally is as
    durable as a lone ``put``."""

    def __init__(self, workers: int = SYNC_WRITERS) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, put: Callable[[ChunkKey, Sequence[Buffer]], object],
            items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        """``put(key, parts)`` of every item, up to ``workers`` at once."""
        if len(items) < 2:
            for key, parts in items:
                put(key, parts)
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kvtier-file-write")
            pool = self._pool
        futures = [pool.submit(put, key, parts) for key, parts in items]
        failure: BaseException | None = None
        for future in futures:
            try:
                future.result()
            except BaseException as exc:  # wait for the others before raising: they use the parts
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


# ---- the tier ----------------------------------------------------------------------------------------
class DiskTier(ScatteredTier):
    """Local-disk tier with a byte cap; thread-safe (one lock for the index, file I/O outside it)."""

    name = "disk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        policy: str = "lru",
        fsync: bool = True,
        *,
        progress: Progress | None = None,
        quarantine_keep: int = 64,
        readahead: bool = True,
    ) -> None:
        self.root = Path(path).expanduser()
        self.capacity_bytes = int(capacity_bytes)
        self.fsync = fsync
        self.quarantine_keep = quarantine_keep
        self.readahead = readahead
        self._next = threading.local()  # per thread: key -> the key its last exists() listed after it
        self._policy = make_policy(policy)
        self._index: dict[ChunkKey, int] = {}
        self._used = 0  # bytes of indexed files
        self._pending = 0  # bytes reserved by writes in flight
        self._full_until = 0.0  # monotonic time until which writes are dropped after ENOSPC
        self._lock = threading.Lock()
        self._made: set[str] = set()
        self._writes = SyncedWrites()
        self.counters: Counter[str] = Counter()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new directory is the user's alone
            (self.root / QUARANTINE).mkdir(exist_ok=True)
            self._lockfile: IO[bytes] | None = open(self.root / ".lock", "a+b")  # noqa: SIM115
        except OSError as exc:
            raise TierUnavailable(f"cannot open disk tier directory {self.root}: {exc}") from exc
        try:
            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise TierUnavailable(
                f"disk tier directory {self.root} is locked by another DiskTier ({self.root / '.lock'}); "
                "use the fs tier to share a directory between processes"
            ) from exc
        self._rebuild(progress)

    # ---- start-up --------------------------------------------------------------------------------
    def _rebuild(self, progress: Progress | None) -> None:
        start = time.perf_counter()
        self.counters["quarantined"] = sum(1 for _ in os.scandir(self.root / QUARANTINE))
        entries = list(iter_files(self.root))
        total = len(entries)
        if total > 10_000:
            log.info("disk tier %s: scanning %d files", self.root, total)
        found: list[tuple[int, ChunkKey, int]] = []
        for i, entry in enumerate(entries):
            if progress is not None and i % 256 == 0:
                progress(i, total)
            if entry.name.endswith(TEMP_SUFFIX):
                self._unlink(Path(entry.path))
                self.counters["stale_temp_removed"] += 1
                continue
            key = key_of(entry.name)
            if key is None:
                continue
            if not entry.is_file(follow_symlinks=False):
                log.warning("disk tier %s: skipping %s: not a regular file", self.root, entry.name)
                self.counters["skipped_not_regular"] += 1
                continue
            checked = self._check_file(Path(entry.path), key)
            if checked is not None:
                found.append((checked[1], key, checked[0]))
        for _mtime, key, size in sorted(found):  # oldest first, so LRU/FIFO evict them first
            self._index[key] = size
            self._policy.insert(key)
            self._used += size
        if progress is not None:
            progress(total, total)
        log.info(
            "disk tier %s: %d chunks, %d bytes indexed in %.2fs",
            self.root, len(self._index), self._used, time.perf_counter() - start,
        )

    def _check_file(self, path: Path, key: ChunkKey) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of a published file whose head is sound; quarantine it otherwise."""
        try:
            fd = open_regular(path)
        except NotRegularFile:
            self.counters["skipped_not_regular"] += 1
            return None
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            meta, expected = read_head(fd)
        except (CorruptChunk, OSError) as exc:
            reason = str(exc)
        else:
            if meta.key != key:
                reason = f"file holds key {meta.key.hex()}"
            elif st.st_size != expected:
                reason = f"file is {st.st_size} bytes, header says {expected}"
            else:
                return st.st_size, st.st_mtime_ns
        finally:
            os.close(fd)
        log.warning("disk tier %s: quarantining %s at start: %s", self.root, path.name, reason)
        self._quarantine_file(path, key)
        return None

    # ---- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _unlink(path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def _subdir(self, key: ChunkKey) -> Path:
        sub = key.hex()[:2]
        path = self.root / sub
        if sub not in self._made:
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                if self.fsync:
                    fsync_dir(self.root)
            self._made.add(sub)
        return path

    def _drop(self, key: ChunkKey) -> int:
        """Forget ``key`` (lock held); return the bytes it held."""
        size = self._index.pop(key, 0)
        self._used -= size
        return size

    def _reserve(self, size: int) -> bool:
        """Make room for ``size`` more bytes, evicting by policy (lock held); False, with nothing
        evicted, if ``size`` cannot fit even once every indexed chunk is gone."""
        if self._pending + size > self.capacity_bytes:
            return False
        victims: list[ChunkKey] = []
        while self._used + self._pending + size > self.capacity_bytes:
            victim = self._policy.victim(lambda _k: True)
            if victim is None:
                break
            self._drop(victim)  # type: ignore[arg-type]
            victims.append(victim)  # type: ignore[arg-type]
        for victim in victims:  # unlinked under the lock so a concurrent put of the key cannot be lost
            self._unlink(chunk_path(self.root, victim))
        self.counters["evictions"] += len(victims)
        if self._used + self._pending + size > self.capacity_bytes:
            return False
        self._pending += size
        return True

    def _quarantine_file(self, path: Path, key: ChunkKey) -> bool:
        target = self.root / QUARANTINE / f"{key.hex()}.{time.time_ns()}{SUFFIX}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return False
        except OSError:
            return self._unlink(path)
        self.counters["quarantined"] += 1
        self._trim_quarantine()
        return True

    def _trim_quarantine(self) -> None:
        """Keep only the ``quarantine_keep`` most recently quarantined files."""
        try:
            files = list(os.scandir(self.root / QUARANTINE))
        except OSError:
            return
        if len(files) <= self.quarantine_keep:
            return

        def when(entry: os.DirEntry[str]) -> int:
            part = entry.name.split(".")
            return int(part[1]) if len(part) == 3 and part[1].isdigit() else 0

        files.sort(key=when)
        for entry in files[: len(files) - self.quarantine_keep]:
            self._unlink(Path(entry.path))

    # ---- Tier ------------------------------------------------------------------------------------
    def private(self) -> bool:
        return private_dir(self.root)

    def put(self, key: ChunkKey, frame: bytes) -> None:
        self.put_parts(key, (frame,))

    def put_parts(self, key: ChunkKey, parts: Sequence[Buffer]) -> None:
        self.write(key, parts)

    def put_many(self, items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        if self.fsync:
            self._writes.run(self.write, items)
        else:  # nothing to wait for: parallel copies into the page cache would only compete for CPU
            super().put_many(items)

    def write(self, key: ChunkKey, parts: Sequence[Buffer]) -> bool:
        """``put_parts`` that says whether the chunk is now stored (False: dropped and counted, because it
        is larger than the tier or the filesystem is full). Raises ``TierUnavailable`` on I/O errors."""
        size = sum(memoryview(p).nbytes for p in parts)
        with self._lock:
            if time.monotonic() < self._full_until:
                self.counters["dropped_disk_full"] += 1
                return False
            if not self._reserve(size):
                self.counters["dropped_no_space"] += 1
                return False
        final = chunk_path(self.root, key)
        try:
            try:
                self._subdir(key)
                publish(final, parts, fsync=self.fsync)
            except FileNotFoundError:  # the fan-out directory was removed under us: recreate it once
                self._made.discard(final.parent.name)
                self._subdir(key)
                publish(final, parts, fsync=self.fsync)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            with self._lock:
                self._pending -= size
                self.counters["write_errors"] += 1
                if full:  # a capacity condition, not an outage: reads go on, writes pause briefly
                    self.counters["enospc"] += 1
                    self._full_until = time.monotonic() + FULL_PAUSE_S
            if full:
                log.warning("disk tier %s: filesystem full, dropping writes for %.1fs", self.root, FULL_PAUSE_S)
                return False
            raise TierUnavailable(f"disk tier {self.root}: cannot write chunk {key.hex()}: {exc}") from exc
        with self._lock:
            self._pending -= size
            self._drop(key)
            self._index[key] = size
            self._used += size
            self._policy.remove(key)
            self._policy.insert(key)
            self.counters["puts"] += 1
        if self.fsync:
            try:
                fsync_dir(final.parent)
            except OSError as exc:
                with self._lock:
                    self.counters["write_errors"] += 1
                raise TierUnavailable(f"disk tier {self.root}: cannot sync directory: {exc}") from exc
        return True

    def get(self, key: ChunkKey) -> bytes | None:
        return self._read(key)

    def get_into_parts(self, key: ChunkKey, parts: Sequence[memoryview]) -> bytes | None:
        """:meth:`ScatteredTier.get_into_parts`: the buffers are filled in order with ``preadv``."""
        with self._lock:
            size = self._index.get(key)
            if size is None:
                return None
            self._policy.touch(key)
        try:
            fd = open_regular(chunk_path(self.root, key))
        except OSError:
            return None  # get sorts out what happened
        try:
            head = read_frame_into(fd, size, parts)
        except OSError:
            return None
        finally:
            os.close(fd)
        if head is None:
            return None
        self._read_ahead(key)
        with self._lock:
            self.counters["gets"] += 1
            self.counters["gets_zero_copy"] += 1
        return head

    def _read_ahead(self, key: ChunkKey) -> None:
        """If ``key`` was in this thread's last ``exists`` answer, ask the kernel to start reading the
        chunk listed after it (``POSIX_FADV_WILLNEED``): a retrieve reads them in that order, and the
        disk can work while the caller verifies and copies this one. One chunk ahead at most."""
        nxt = getattr(self._next, "map", {}).get(key)
        if nxt is None:
            return
        with contextlib.suppress(OSError):
            fd = open_regular(chunk_path(self.root, nxt))
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _read(self, key: ChunkKey) -> bytes | None:
        with self._lock:
            size = self._index.get(key)
            if size is None:
                return None
            self._policy.touch(key)
        path = chunk_path(self.root, key)
        try:
            fd = open_regular(path)
        except NotRegularFile:  # replaced by a FIFO/device under us: never read it
            with self._lock:
                self.counters["skipped_not_regular"] += 1
                self._drop(key)
                self._policy.remove(key)
            return None
        except FileNotFoundError:  # evicted or deleted meanwhile
            self._forget_if(key, size)
            return None
        except OSError as exc:
            raise TierUnavailable(f"disk tier {self.root}: cannot open {path.name}: {exc}") from exc
        try:
            actual = os.fstat(fd).st_size
            data = None
            if actual == size:
                data = read_exact(fd, size)
        except OSError as exc:
            raise TierUnavailable(f"disk tier {self.root}: cannot read {path.name}: {exc}") from exc
        finally:
            os.close(fd)
        if data is None:
            with self._lock:
                if self._index.get(key) != size:  # replaced meanwhile: the new file is someone else's
                    return None
            log.warning("disk tier %s: %s is %d bytes, expected %d", self.root, path.name, actual, size)
            self.discard(key)
            return None
        with self._lock:
            self.counters["gets"] += 1
        return data

    def _forget_if(self, key: ChunkKey, size: int) -> None:
        with self._lock:
            if self._index.get(key) == size and not chunk_path(self.root, key).exists():
                self._drop(key)
                self._policy.remove(key)

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            found = [k in self._index for k in keys]
        if self.readahead:  # a retrieve reads the present ones next, in this order (see _read_ahead)
            present = [k for k, f in zip(keys, found) if f]
            self._next.map = dict(itertools.pairwise(present))
        return found

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self._index:
                return False
            self._drop(key)
            self._policy.remove(key)
            return self._unlink(chunk_path(self.root, key))

    def discard(self, key: ChunkKey) -> None:
        with self._lock:
            self._drop(key)
            self._policy.remove(key)
            self._quarantine_file(chunk_path(self.root, key), key)

    def clear(self) -> int:
        with self._lock:
            keys = list(self._index)
            for key in keys:
                self._drop(key)
                self._policy.remove(key)
                self._unlink(chunk_path(self.root, key))
            return len(keys)

    def close(self) -> None:
        self._writes.close()
        if self._lockfile is not None:
            self._lockfile.close()  # releases the flock
            self._lockfile = None

    # ---- introspection ---------------------------------------------------------------------------
    def keys(self) -> list[ChunkKey]:
        """Indexed keys, least recently inserted first."""
        with self._lock:
            return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        """Bytes of the indexed files (what counts against ``capacity_bytes``)."""
        return self._used

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = {
                "chunks": len(self._index),
                "bytes": self._used,
                "capacity_bytes": self.capacity_bytes,
            }
            for name in ("quarantined", "evictions", "write_errors", "enospc", "dropped_no_space",
                         "dropped_disk_full", "skipped_not_regular"):
                out[name] = self.counters[name]
            out.update({k: v for k, v in self.counters.items() if k not in out})
        return out
