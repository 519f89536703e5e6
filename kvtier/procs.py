"""Helper processes: start a child, wait for its protocol lines without ever losing one, stop it.

Tests and benchmarks drive real processes (kvtier's own subcommands, vLLM and SGLang engines, test
workers) that announce readiness and answer commands with text lines. Two rules make that reliable:

- **A reader thread per child.** :class:`Child` reads the protocol stream in a daemon thread that
  pushes every complete line into a queue; :meth:`Child.expect` waits on that queue. The old pattern
  (``select()`` on a buffered text pipe, then ``readline()``) loses lines: when two lines arrive in one
  pipe read, the second stays in Python's buffer while ``select()`` waits on an fd with nothing new.
- **Protocol lines on their own stream.** ``channel="fd"``: the parent creates a pipe and passes its
  write end to the child, named by the environment variable :data:`PROTOCOL_FD_ENV`; the child writes
  protocol lines there (:func:`protocol_stream`) while everything it prints on stdout and stderr (an
  engine's own logging) goes to the log file. ``channel="stdout"`` is for children that keep stdout to
  themselves and log on stderr (``kvtier controller``/``server``/``router`` print one address line);
  their stderr goes to the log file. ``channel=None``: no protocol, stdout and stderr both to the log.

Invariants: every line the child writes to the protocol stream is seen by :meth:`Child.expect`
exactly once and in order (lines that do not match are skipped, kept for error messages); a child
that exits, or stays silent past the timeout, raises (:class:`ChildExited`, ``TimeoutError``) with the
tail of its log, never hangs. :meth:`Child.stop` always reaps the process and closes every pipe.

A child starts in a session (and process group) of its own, so stopping it also stops whatever it
started (an engine's worker processes): :func:`stop_process` signals the whole group and leaves no
member of it running.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TextIO

PROTOCOL_FD_ENV = "KVTIER_PROTOCOL_FD"

Channel = Literal["stdout", "fd"] | None


class ChildExited(RuntimeError):
    """The child's protocol stream ended (the process exited) before the expected line arrived."""


def protocol_stream() -> TextIO:
    """In a child: the text stream for protocol lines. The pipe named by :data:`PROTOCOL_FD_ENV` when
    the parent started it with ``channel="fd"``, else stdout. Write whole lines and flush."""
    fd = os.environ.get(PROTOCOL_FD_ENV)
    if not fd:
        return sys.stdout
    try:
        return open(int(fd), "w", buffering=1, encoding="utf-8", closefd=False)
    except (ValueError, OSError) as exc:
        raise RuntimeError(f"{PROTOCOL_FD_ENV}={fd!r} is not an open file descriptor of this process") from exc


class Child:
    """A started child process whose protocol lines a reader thread queues (see the module docstring).

    ``log``: file for the child's output that is not protocol (stderr, and stdout too with
    ``channel="fd"`` or ``None``); ``None`` leaves it on this process's own stdout/stderr.
    ``stdin=True`` opens a pipe for :meth:`send`.
    """

    def __init__(self, argv: Sequence[str], *, log: Path | None = None, env: Mapping[str, str] | None = None,
                 channel: Channel = "stdout", stdin: bool = False, cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._skipped: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None
        child_env = dict(os.environ if env is None else env)
        read_fd = write_fd = -1
        if channel == "fd":
            read_fd, write_fd = os.pipe()
            child_env[PROTOCOL_FD_ENV] = str(write_fd)
        log_file = log.open("ab") if log is not None else None
        try:
            stdout: Any = subprocess.PIPE if channel == "stdout" else log_file
            stderr: Any = subprocess.STDOUT if (channel != "stdout" and log_file is not None) else log_file
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                env=child_env, cwd=cwd, pass_fds=(write_fd,) if write_fd >= 0 else (), start_new_session=True)
        except BaseException:
            if read_fd >= 0:
                os.close(read_fd)
            raise
        finally:
            if write_fd >= 0:
                os.close(write_fd)  # the child holds its copy: EOF reaches the reader when the child exits
            if log_file is not None:
                log_file.close()  # likewise
        source: IO[bytes] | None = None
        if channel == "stdout":
            source = self.proc.stdout
        elif channel == "fd":
            source = os.fdopen(read_fd, "rb")
        if source is not None:
            self._reader = threading.Thread(target=self._read, args=(source,), daemon=True,
                                            name=f"reader-{self.proc.pid}")
            self._reader.start()

    def _read(self, source: IO[bytes]) -> None:
        text = io.TextIOWrapper(source, encoding="utf-8", errors="replace")
        try:
            for line in text:
                self.lines.put(line.rstrip("\n"))
        except (OSError, ValueError):  # the pipe closed under us
            pass
        finally:
            with contextlib.suppress(OSError):
                text.close()
            self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, pattern: str | re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """The match of the next protocol line that ``pattern`` finds (``re.search``), skipping others.
        Raises ``TimeoutError`` after ``timeout_s`` and :class:`ChildExited` when the stream ends first."""
        if self._reader is None:
            raise RuntimeError(f"{self.argv[:3]!r} was started without a protocol channel")
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self._name()}: no line matching {regex.pattern!r} within {timeout_s:g}s"
                                   f"{self._context()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)  # stays ended for the next caller
                code = self.proc.poll()
                if code is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        code = self.proc.wait(5)
                raise ChildExited(f"{self._name()} closed its protocol stream (exit code {code}) before a line "
                                  f"matching {regex.pattern!r}{self._context()}")
            match = regex.search(line)
            if match:
                return match
            self._skipped.append(line)

    def send(self, line: str) -> None:
        """Write one line (a newline is added) to the child's stdin and flush it."""
        if self.proc.stdin is None:
            raise RuntimeError(f"{self.argv[:3]!r} was started without stdin=True")
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """Close the child's stdin (its end-of-input), if it has one."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the log file ('' without one)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
            return f.read().decode("utf-8", "replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        """Stop the child and its process group (SIGTERM, SIGKILL after ``timeout_s``), reap it, end the
        reader; its exit code. Processes it started are stopped even when the child itself has exited."""
        self.close_stdin()
        stop_process(self.proc, timeout_s, group=self.proc.pid)  # its own group: started a new session
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> Child:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _name(self) -> str:
        return f"process {self.proc.pid} ({' '.join(self.argv[:4])[:120]})"

    def _context(self) -> str:
        parts = []
        if self._skipped:
            parts.append("last other lines:\n" + "\n".join(self._skipped))
        tail = self.log_tail()
        if tail:
            parts.append(f"log {self.log_path}:\n{tail}")
        return "".join("\n" + p for p in parts)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 15.0, *, group: int | None = None) -> None:
    """Terminate a helper process and its process group; SIGKILL what ignores SIGTERM for ``timeout_s``;
    always reap ``proc``.

    ``group``: the process group to stop with it; default: ``proc``'s own group when it leads one
    (started with ``start_new_session=True``), else none (only ``proc`` is signalled; this process's own
    group is never signalled). Members of the group that outlive ``proc`` (workers finishing their
    shutdown) get the rest of ``timeout_s``, then SIGKILL; it returns once none is left running.
    """
    deadline = time.monotonic() + timeout_s
    if group is None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(proc.pid) == proc.pid:
                group = proc.pid
    if group == os.getpgrp():
        group = None
    _signal(proc, group, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _signal(proc, group, signal.SIGKILL)
        proc.wait()
    if group is None:
        return
    while _group_running(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_running(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        gone = time.monotonic() + 5.0
        while _group_running(group) and time.monotonic() < gone:
            time.sleep(0.05)


def _signal(proc: subprocess.Popen[Any], group: int | None, sig: signal.Signals) -> None:
    if group is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
    elif proc.returncode is None:
        proc.send_signal(sig)


def _group_running(group: int) -> bool:
    """Some process of process group ``group`` is still running (zombies waiting to be reaped by
    someone else do not count)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # no procfs: any member, zombie or not
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def free_port() -> int:
    """A TCP port free on loopback now (the OS may hand it out again once the caller binds nothing)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[Any], timeout_s: float = 300.0, what: str = "server") -> None:
    """Block until ``url/health`` answers 200; raise ``RuntimeError`` if ``proc`` exits first and
    ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what} at {url} was not ready after {timeout_s:.0f} s")


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of process ``pid`` (this one by default) from ``/proc/<pid>/statm``; None where
    /proc is not readable (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
