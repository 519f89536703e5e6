"""``kvtier bench startup``: how long the control-plane processes take to import and to start.

Measured in fresh interpreters, in the same run: ``python -c pass`` (the floor every process pays)
and ``import torch`` (what the control plane would pay if it loaded torch) as references, then the
import of ``kvtier.cluster.controller`` / ``kvtier.router.app`` / ``kvtier.server.app`` and the time
from spawning ``kvtier controller`` / ``kvtier router`` / ``kvtier server`` to its "listening" line.
Each row also records whether torch ended up in the process (it must not: tests/test_architecture.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import typer

IMPORTS = {
    "python -c pass (floor)": "pass",
    "import torch (reference)": "import torch",
    "import kvtier.cluster.controller": "import kvtier.cluster.controller",
    "import kvtier.router.app": "import kvtier.router.app",
    "import kvtier.server.app": "import kvtier.server.app",
}
STARTS = {
    "kvtier controller": ["-m", "kvtier.cli", "controller", "--port", "0", "--log-level", "warning"],
    "kvtier router": ["-m", "kvtier.cli", "router", "--port", "0", "--log-level", "warning",
                      "--backend", "http://127.0.0.1:9"],  # a backend is required; never contacted here
    "kvtier server": ["-m", "kvtier.server", "--port", "0", "--log-level", "warning"],
}


def _import_once(code: str) -> tuple[float, bool]:
    """Seconds to run ``code`` in a fresh interpreter, and whether torch ended up loaded."""
    probe = f"{code}\nimport sys; print('torch' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    return time.perf_counter() - start, out.stdout.strip().endswith("True")


def _start_once(args: list[str]) -> float:
    """Seconds from spawning ``args`` to its listening line (stopping it afterwards is not timed). A child
    that exits or stays silent for 120 s raises with what it printed."""
    from kvtier.procs import Child

    start = time.perf_counter()
    with Child([sys.executable, *args]) as child:
        child.expect("listening on", 120)
        return time.perf_counter() - start


def run(repeat: int = 5, out_dir: str = "results", show: bool = True) -> dict[str, Any]:
    from kvtier.bench.common import Report

    times: dict[str, list[float]] = {name: [] for name in (*IMPORTS, *STARTS)}
    torch_loaded: dict[str, bool] = {}
    for i in range(repeat + 1):  # run 0 warms the page cache
        for name, code in IMPORTS.items():
            seconds, torch_loaded[name] = _import_once(code)
            if i:
                times[name].append(seconds)
        for name, args in STARTS.items():
            seconds = _start_once(args)
            if i:
                times[name].append(seconds)
    report = Report("bench_startup", "Control-plane import and start time (fresh interpreters)", unit="s",
                    meta={"repeat": repeat})
    torch_ref = report.add("import torch (reference)", times["import torch (reference)"], torch_loaded=True)
    for name in times:
        if name != torch_ref.label:
            report.add(name, times[name], vs=torch_ref, torch_loaded=torch_loaded.get(name, "not probed"))
    return report.finish(out_dir, show=show)


def register(app: typer.Typer) -> None:
    @app.command("startup")
    def startup_cmd(
        repeat: int = typer.Option(5, min=1, help="Timed runs (min/median/max reported)."),
        quick: bool = typer.Option(False, "--quick", help="2 runs: proves it works, numbers rough."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """Controller / router / server import and start time (fresh processes), torch-free check;
        ratio = speed against `import torch`."""
        run(2 if quick else repeat, out)
