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
    probe = f"{code}\nimport sys; print('torch' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    return time.perf_counter() - start, out.stdout.strip().endswith("True")


def _start_once(args: list[str]) -> float:
    from kvtier.bench.common import stop_process

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                return time.perf_counter() - start
        raise RuntimeError(f"{args} exited without listening")
    finally:
        stop_process(proc)


def run(repeat: int = 5, out_dir: str = "results") -> dict[str, Any]:
    from kvtier.bench.common import Timing, bar_plot, ratio, write_results

    runs: dict[str, list[float]] = {name: [] for name in (*IMPORTS, *STARTS)}
    torch_loaded: dict[str, bool] = {}
    for i in range(repeat + 1):  # run 0 warms the page cache
        for name, code in IMPORTS.items():
            seconds, loaded = _import_once(code)
            torch_loaded[name] = loaded
            if i:
                runs[name].append(seconds)
        for name, args in STARTS.items():
            seconds = _start_once(args)
            if i:
                runs[name].append(seconds)
    timings = {name: Timing(r) for name, r in runs.items()}
    torch_ref = timings["import torch (reference)"]
    result: dict[str, Any] = {"repeat": repeat}
    for name, t in timings.items():
        result[name] = {**t.summary(), "torch_loaded": torch_loaded.get(name),
                        "speed_vs_import_torch": ratio(t, torch_ref)}
    write_results("bench_startup", result, out_dir)
    names = list(timings)
    bar_plot(f"{out_dir}/bench_startup.png", "Control-plane import and start time", names,
             {"seconds (median)": [timings[n].median for n in names]}, "s",
             errors={"seconds (median)": ([timings[n].min for n in names], [timings[n].max for n in names])})
    return result


def register(app: typer.Typer) -> None:
    @app.command("startup")
    def startup_cmd(
        repeat: int = typer.Option(5, help="Timed runs (min/median/max reported)."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """Controller / router / server import and start time (fresh processes), torch-free check."""
        from rich.console import Console
        from rich.table import Table

        r = run(repeat, out)
        table = Table(title="Control-plane startup (fresh interpreters)")
        for col in ("what", "min s", "median s", "max s", "torch loaded", "÷ import torch (median)"):
            table.add_column(col)
        for name in (*IMPORTS, *STARTS):
            p = r[name]
            loaded = "" if p["torch_loaded"] is None else str(p["torch_loaded"])
            table.add_row(name, f"{p['min_s']:.2f}", f"{p['median_s']:.2f}", f"{p['max_s']:.2f}", loaded,
                          f"{p['speed_vs_import_torch']['median']:.2f}x faster")
        Console().print(table)
