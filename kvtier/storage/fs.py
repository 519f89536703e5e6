"""Shared-filesystem tier: a directory that several kvtier processes (and hosts) use at once.

Same file layout as :mod:`kvtier.storage.disk` (``<hh>/<hex>.kvt``, ``quarantine/``), but no process
owns the directory and nothing is kept in memory: ``exists`` is a ``stat``, ``get`` an ``open``.

Invariants:
- Published files are immutable: a ``put`` writes a temp file whose name is unique across processes
  and hosts (uuid4), syncs it (``fsync=True``), then ``rename``\\ s it over the final name. Readers
  therefore see no file, the previous complete frame or the new complete frame, never a mix; a reader
  that opened the old file keeps reading the old inode.
- A file may vanish at any moment (another process deleted, cleared or quarantined it): every such
  case is a miss, never an error.
- ``get`` returns a frame only if its length equals what its fixed header announces; anything else is
  quarantined. Checksums are left to the caller (the manager verifies every frame).
- Only regular files are read (see :func:`kvtier.storage.disk.open_regular`): anything else named like
  a chunk is a counted miss (``skipped_not_regular``), never a blocked open.
- Temp files are removed by their writer on failure; ones left by a crashed writer are removed at
  start once older than ``stale_temp_s`` (younger ones may belong to a live writer).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from kvtier.errors import CorruptChunk, TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.storage.base import ScatteredTier
from kvtier.storage.disk import (
    QUARANTINE,
    SUFFIX,
    TEMP_SUFFIX,
    Buffer,
    NotRegularFile,
    SyncedWrites,
    chunk_path,
    frame_length,
    fsync_dir,
    iter_files,
    key_of,
    open_regular,
    publish,
    read_exact,
    read_frame_into,
)


class FsTier(ScatteredTier):
    """Tier over a shared directory; thread-safe and multi-process safe without any lock."""

    name = "fs"

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, stale_temp_s: float = 3600.0
    ) -> None:
        self.root = Path(path).expanduser()
        self.fsync = fsync
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()  # guards counters only
        self._writes = SyncedWrites()
        try:
            (self.root / QUARANTINE).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TierUnavailable(f"cannot open shared directory {self.root}: {exc}") from exc
        self._remove_stale_temps(stale_temp_s)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _remove_stale_temps(self, age_s: float) -> None:
        cutoff = time.time() - age_s
        for entry in iter_files(self.root):
            if entry.name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        self._count("stale_temp_removed")

    def _unavailable(self, op: str, key: ChunkKey, exc: OSError) -> TierUnavailable:
        self._count("errors")
        return TierUnavailable(f"fs tier {self.root}: {op} {key.hex()} failed: {exc}")

    # ---- Tier ------------------------------------------------------------------------------------
    def put(self, key: ChunkKey, frame: bytes) -> None:
        self.put_parts(key, (frame,))

    def put_parts(self, key: ChunkKey, parts: Sequence[Buffer]) -> None:
        final = chunk_path(self.root, key)
        tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            final.parent.mkdir(exist_ok=True)
            size = publish(final, parts, fsync=self.fsync, tmp=tmp)
            if self.fsync:
                fsync_dir(final.parent)
        except OSError as exc:
            self._count("write_errors")
            raise self._unavailable("put", key, exc) from exc
        with self._lock:
            self.counters["puts"] += 1
            self.counters["bytes_written"] += size

    def put_many(self, items: Sequence[tuple[ChunkKey, Sequence[bytes | memoryview]]]) -> None:
        """Several files at once when syncing (see :class:`kvtier.storage.disk.SyncedWrites`)."""
        if self.fsync:
            self._writes.run(self.put_parts, items)
        else:
            super().put_many(items)

    def get(self, key: ChunkKey) -> bytes | None:
        return self._read(key)

    def get_into_parts(self, key: ChunkKey, parts: Sequence[memoryview]) -> bytes | None:
        try:
            fd = open_regular(chunk_path(self.root, key))
        except OSError:
            return None  # get sorts out what happened
        try:
            head = read_frame_into(fd, os.fstat(fd).st_size, parts)
        except OSError:
            return None
        finally:
            os.close(fd)
        if head is not None:
            with self._lock:
                self.counters["gets"] += 1
                self.counters["gets_zero_copy"] += 1
                self.counters["bytes_read"] += len(head) + sum(p.nbytes for p in parts)
        return head

    def _read(self, key: ChunkKey) -> bytes | None:
        path = chunk_path(self.root, key)
        try:
            fd = open_regular(path)
        except NotRegularFile:  # a FIFO or device named like a chunk: never read, never removed
            self._count("skipped_not_regular")
            self._count("misses")
            return None
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as exc:
            raise self._unavailable("open", key, exc) from exc
        try:
            size = os.fstat(fd).st_size
            data = read_exact(fd, size)
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc
        finally:
            os.close(fd)
        try:
            if data is None or frame_length(data) != len(data):
                raise CorruptChunk(f"file holds {size} bytes, not the length its header announces")
        except CorruptChunk:
            self.discard(key)
            return None
        with self._lock:
            self.counters["gets"] += 1
            self.counters["bytes_read"] += len(data)
        return data

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = []
        for key in keys:
            try:
                out.append(stat.S_ISREG(os.lstat(chunk_path(self.root, key)).st_mode))
            except FileNotFoundError:
                out.append(False)
            except OSError as exc:
                raise self._unavailable("stat", key, exc) from exc
        return out

    def delete(self, key: ChunkKey) -> bool:
        try:
            os.unlink(chunk_path(self.root, key))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._unavailable("delete", key, exc) from exc

    def discard(self, key: ChunkKey) -> None:
        target = self.root / QUARANTINE / f"{key.hex()}.{time.time_ns()}{uuid.uuid4().hex[:8]}{SUFFIX}"
        try:
            os.rename(chunk_path(self.root, key), target)
        except FileNotFoundError:  # someone else already removed or quarantined it
            return
        except OSError as exc:
            raise self._unavailable("quarantine", key, exc) from exc
        self._count("quarantined")

    def clear(self) -> int:
        removed = 0
        for entry in iter_files(self.root):
            if key_of(entry.name) is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def close(self) -> None:
        self._writes.close()

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            return dict(self.counters)

