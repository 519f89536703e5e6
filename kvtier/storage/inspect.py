"""Inspection of chunk files and disk/fs tier directories, used by ``kvtier inspect``.

Read-only: it never takes the disk tier's lock, removes temp files or quarantines anything, so it is
safe to run against a directory a live process is using.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvtier import wire
from kvtier.errors import CorruptChunk
from kvtier.storage.disk import QUARANTINE, TEMP_SUFFIX, iter_files, key_of


@dataclass
class FileReport:
    """What one chunk file holds and whether it verified."""

    path: Path
    size: int
    meta: wire.ChunkMeta | None = None
    payload_len: int = 0
    error: str | None = None


@dataclass
class DirReport:
    chunks: int = 0
    bytes: int = 0
    temp_files: int = 0
    quarantined: int = 0
    other: int = 0
    corrupt: list[FileReport] = field(default_factory=list)


def check_file(path: Path, verify: bool = True) -> FileReport:
    """Read ``path``; with ``verify`` check the whole frame (lengths, checksum, metadata, file name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return FileReport(path, 0, error=str(exc))
    report = FileReport(path, len(data))
    try:
        if verify:
            meta, payload = wire.unpack_meta(data)
            report.payload_len = len(payload)
        else:
            meta = wire.peek_meta(data)
            report.payload_len = wire.read_header(data)[1]
        report.meta = meta
        expected = key_of(path.name)
        if expected is not None and meta.key != expected:
            raise CorruptChunk(f"file name says key {expected.hex()}, frame holds {meta.key.hex()}")
    except CorruptChunk as exc:
        report.error = str(exc)
    return report


def scan_dir(root: Path, verify: bool = True, progress: bool = True) -> DirReport:
    """Summarize every file of a disk/fs tier directory."""
    from rich.progress import Progress

    report = DirReport()
    with contextlib.suppress(FileNotFoundError):
        report.quarantined = sum(1 for _ in os.scandir(root / QUARANTINE))
    entries = list(iter_files(root))
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("verifying" if verify else "reading heads", total=len(entries))
        for entry in entries:
            bar.advance(task)
            if entry.name.endswith(TEMP_SUFFIX):
                report.temp_files += 1
                continue
            if key_of(entry.name) is None or not entry.is_file(follow_symlinks=False):  # never open a FIFO
                report.other += 1
                continue
            file = check_file(Path(entry.path), verify)
            report.chunks += 1
            report.bytes += file.size
            if file.error is not None:
                report.corrupt.append(file)
    return report
