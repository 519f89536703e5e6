"""Start a private ``mooncake_master`` (with its built-in HTTP metadata server) on loopback ports: for
tests, benchmarks and single-host setups. Ports are picked free once: ``stop()`` then ``start()``
reuses them so clients find the master again.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path


def master_binary() -> Path:
    """The ``mooncake_master`` executable shipped in the ``mooncake`` package; ``RuntimeError`` with the
    reason when it is missing or cannot run (e.g. ``libibverbs.so.1`` not installed)."""
    try:
        import mooncake
    except ImportError as exc:
        raise RuntimeError("mooncake-transfer-engine-non-cuda is missing: pip install 'kvtier[mooncake]'") from exc
    path = Path(mooncake.__file__).parent / "mooncake_master"
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the mooncake package")
    probe = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in probe.stderr:
        raise RuntimeError(f"mooncake_master cannot run: {probe.stderr.strip()} (apt-get install libibverbs1)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MooncakeMaster:
    """A ``mooncake_master`` process; ``master`` and ``metadata_server`` are what clients are given."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.binary = master_binary()
        self.rpc_port, self.http_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.master = f"127.0.0.1:{self.rpc_port}"
        self.metadata_server = f"http://127.0.0.1:{self.http_port}/metadata"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> MooncakeMaster:
        args = [str(self.binary), f"-rpc_port={self.rpc_port}", "-rpc_address=127.0.0.1",
                "-enable_http_metadata_server=true", "-http_metadata_server_host=127.0.0.1",
                f"-http_metadata_server_port={self.http_port}", "-metrics_host=127.0.0.1",
                f"-metrics_port={self.metrics_port}"]
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if self.log_path:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while not (self._listening(self.rpc_port) and self._listening(self.http_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mooncake_master did not start (log: {self.log_path})")
            time.sleep(0.05)
        return self

    @staticmethod
    def _listening(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        return False

    def stop(self) -> None:
        """Kill the master (SIGKILL: as abrupt as a crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> MooncakeMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
