"""Shared benchmark helpers: repeated timing with min/median/max, JSON + PNG output.

Every benchmark reports ratios against a ceiling measured in the same run, never absolute numbers
alone, because this machine is noisy.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# the process helpers live in kvtier.procs; re-exported for the benchmarks and integrations that import them here
from kvtier.extras import require
from kvtier.procs import free_port as free_port
from kvtier.procs import stop_process as stop_process
from kvtier.procs import wait_healthy as wait_healthy


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs of one operation."""

    runs: list[float]

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    def summary(self) -> dict[str, float]:
        return {"min_s": self.min, "median_s": self.median, "max_s": self.max, "runs": len(self.runs)}

    def rate(self, amount: float) -> dict[str, float]:
        """``amount`` per second at the fastest, median and slowest run (e.g. GB/s)."""
        return {"min": amount / self.max, "median": amount / self.median, "max": amount / self.min}


def time_runs(fn: Callable[[], object], repeat: int = 5, warmup: int = 1,
              setup: Callable[[], object] | None = None) -> Timing:
    """Run ``fn`` ``warmup`` + ``repeat`` times (``setup`` before each, untimed); keep the timed runs."""
    runs = []
    for i in range(warmup + repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            runs.append(elapsed)
    return Timing(runs)


def ratio(ours: Timing, ceiling: Timing) -> dict[str, float]:
    """Throughput ratio ours ÷ ceiling (>1 means faster than the ceiling) at median, plus spread."""
    return {
        "median": ceiling.median / ours.median,
        "worst": ceiling.min / ours.max,
        "best": ceiling.max / ours.min,
    }


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def write_results(name: str, data: dict[str, Any], out_dir: Path | str = "results") -> Path:
    """Write ``results/<name>.json`` (with machine info) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **data}
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "runs") else str(o)))
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the ``bench`` extra installs matplotlib)."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "bench")


def bar_plot(path: Path | str, title: str, labels: list[str], series: dict[str, list[float]],
             ylabel: str, errors: dict[str, tuple[list[float], list[float]]] | None = None) -> Path:
    """Grouped bar chart; ``errors[name] = (low, high)`` absolute values drawn as min/max whiskers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(series))), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        yerr = None
        if errors and name in errors:
            low, high = errors[name]
            yerr = [[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]]
        ax.bar(xs, values, width, label=name, yerr=yerr, capsize=3)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
