"""kvtier.procs.Child with real child processes: no protocol line is lost, protocol and logs are apart,
and a silent or dead child raises with its log instead of hanging."""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvtier.procs import Child, ChildExited, protocol_stream, stop_process

# one write carrying a log line and READY, then the child waits (as vLLM does for commands on stdin)
TWO_LINES_ONE_WRITE = textwrap.dedent(
    """
    import sys, time
    sys.stdout.write("INFO loading weights\\nREADY 42\\n")
    sys.stdout.flush()
    time.sleep(60)
    """
)


def test_old_select_readline_pattern_loses_the_second_line() -> None:
    """The pattern the helper replaces: select() on the buffered pipe, then readline(). The READY line
    sits in Python's buffer and select() reports nothing (why a real-vLLM test waited 400 s)."""
    proc = subprocess.Popen([sys.executable, "-c", TWO_LINES_ONE_WRITE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline().startswith("INFO")
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        assert not ready  # READY 42 was already read from the pipe: select() cannot see it
    finally:
        proc.kill()
        proc.wait()


def test_child_sees_a_line_that_arrived_in_the_same_write(tmp_path: Path) -> None:
    with Child([sys.executable, "-c", TWO_LINES_ONE_WRITE], log=tmp_path / "child.log") as child:
        match = child.expect(r"^READY (\d+)$", 30)
        assert match.group(1) == "42"
        assert child.proc.poll() is None  # still waiting: the line came before the child's exit


def test_fd_channel_keeps_protocol_apart_from_logs(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import logging, sys
        from kvtier.procs import protocol_stream
        from kvtier.config import load_config
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)
        load_config()  # KVTIER_PROTOCOL_FD in the environment is not taken for a config key
        out = protocol_stream()
        logging.info("READY lookalike from the engine's logger")
        print("engine chatter on stdout", flush=True)
        out.write("READY {}\\n")
        out.flush()
        for line in sys.stdin:
            print("log: got " + line.strip(), file=sys.stderr, flush=True)
            out.write("RESULT " + line.strip().upper() + "\\n")
            out.flush()
        """
    )
    log = tmp_path / "engine.log"
    with Child([sys.executable, "-c", script], log=log, channel="fd", stdin=True) as child:
        assert child.expect(r"^READY ", 30).string == "READY {}"  # not the logger's lookalike
        child.send("ping")
        assert child.expect(r"^RESULT (.*)$", 30).group(1) == "PING"
        child.close_stdin()
        with pytest.raises(ChildExited, match="exit code 0"):
            child.expect("never", 30)
    text = log.read_text()
    assert "READY lookalike" in text and "engine chatter" in text and "log: got ping" in text
    assert "RESULT" not in text  # protocol lines went to the protocol pipe only


def test_exit_before_the_line_raises_with_the_log(tmp_path: Path) -> None:
    script = "import sys; print('boom: model not found', file=sys.stderr); sys.exit(3)"
    child = Child([sys.executable, "-c", script], log=tmp_path / "c.log")
    with child, pytest.raises(ChildExited, match=r"(?s)exit code 3.*boom: model not found"):
        child.expect("READY", 60)


def test_silence_raises_timeout_naming_skipped_lines(tmp_path: Path) -> None:
    script = "import time; print('still loading', flush=True); time.sleep(60)"
    child = Child([sys.executable, "-c", script], log=tmp_path / "c.log")
    with child, pytest.raises(TimeoutError, match=r"(?s)'READY'.*still loading"):
        child.expect("READY", 0.5)
    assert child.proc.returncode is not None  # stop() reaped it


def test_protocol_stream_defaults_to_stdout_and_rejects_a_bad_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVTIER_PROTOCOL_FD", raising=False)
    assert protocol_stream() is sys.stdout
    monkeypatch.setenv("KVTIER_PROTOCOL_FD", "not-a-number")
    with pytest.raises(RuntimeError, match="KVTIER_PROTOCOL_FD='not-a-number'"):
        protocol_stream()


def test_expect_without_a_channel_is_an_error(tmp_path: Path) -> None:
    child = Child([sys.executable, "-c", "print('x')"], log=tmp_path / "c.log", channel=None)
    with child, pytest.raises(RuntimeError, match="without a protocol channel"):
        child.expect("x", 1)


def test_rss_bytes_follows_touched_memory_and_is_none_for_a_gone_process() -> None:
    from kvtier.procs import rss_bytes

    assert (rss_bytes() or 0) > 1 << 20
    # a fresh interpreter, whose allocator holds no freed memory that the block could reuse
    code = ("from kvtier.procs import rss_bytes\nbefore = rss_bytes()\nblock = bytes([1]) * (64 << 20)\n"
            "print(before, rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after = (int(v) for v in out.stdout.split())
    assert after - before >= 48 << 20, (before, after)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert rss_bytes(proc.pid) is None


# the child starts a grandchild (as an engine starts its workers) that ignores SIGTERM, then waits
PARENT_OF_STUBBORN = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    grandchild.stdout.readline()  # its SIGTERM handler is in place
    print(f"GRANDCHILD {grandchild.pid}", flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
    """
)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"  # a zombie is dead, only not yet reaped


def test_stop_ends_the_childs_own_children_too(tmp_path: Path) -> None:
    with Child([sys.executable, "-c", PARENT_OF_STUBBORN, "wait"], log=tmp_path / "c.log") as child:
        grandchild = int(child.expect(r"^GRANDCHILD (\d+)$", 30).group(1))
        assert _running(grandchild)
        child.stop(timeout_s=1.0)  # SIGTERM to the group, SIGKILL for the one that ignores it
    assert child.proc.returncode is not None and not _running(grandchild)


def test_stop_ends_children_a_dead_child_left_behind(tmp_path: Path) -> None:
    child = Child([sys.executable, "-c", PARENT_OF_STUBBORN, "exit"], log=tmp_path / "c.log")
    with child:
        grandchild = int(child.expect(r"^GRANDCHILD (\d+)$", 30).group(1))
        with pytest.raises(ChildExited, match="exit code 0"):
            child.expect("never", 30)
        assert _running(grandchild)  # orphaned, still in the child's process group
        child.stop(timeout_s=1.0)
    assert not _running(grandchild)


def test_stop_process_stops_the_group_of_a_session_leader() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT_OF_STUBBORN, "wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline().split()[1])
    proc.stdout.close()
    stop_process(proc, 1.0)
    assert proc.returncode is not None and not _running(grandchild)
