"""Shared benchmark helpers: timing, the :class:`Report` every timing benchmark ends with, JSON + PNG.

Every benchmark reports ratios against a ceiling measured in the same run, never absolute numbers
alone, because the machines it runs on are noisy. The shape of a benchmark module:

- ``run(..., out_dir, show=True) -> dict``: measure (:func:`interleaved` times all operations once per
  run, order reversed every other run), add one :class:`Report` row per operation with its ceiling row
  as ``vs``, and ``return report.finish(out_dir, show=show)`` (``results/<name>.json`` + ``.png`` +
  the printed table);
- ``register(app)``: one ``kvtier bench <name>`` command with a ``--quick`` mode, heavy imports inside
  the command so that ``kvtier bench --help`` stays fast; its module is listed in
  ``kvtier.cli.BENCH_MODULES``.

Engine benchmarks (``kvtier bench router`` / ``vllm`` / ``sglang``) have the same shape and run in the
interpreter that has the engine installed (``.venv-vllm/bin/kvtier bench vllm``): their ``run`` starts
with :func:`require_engine`, which fails with the command to use when the engine is not importable.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtier.errors import KvtierError
from kvtier.extras import require


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


def interleaved(ops: dict[str, Callable[[], object]], repeat: int, *,
                prepare: dict[str, Callable[[], object]] | None = None, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``repeat`` runs of every op, all ops once per run, the order reversed every other run
    so that the machine's drift hits them alike (pairs of adjacent ops stay adjacent). ``prepare[name]``
    runs untimed right before ``name``; the first ``warmup`` runs are not kept."""
    names = list(ops)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeat):
        for name in names if i % 2 == 0 else names[::-1]:
            if prepare and name in prepare:
                prepare[name]()
            start = time.perf_counter()
            ops[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def require_engine(engine: str, command: str) -> None:
    """Fail with a clear :class:`KvtierError` unless ``engine`` (``vllm``, ``sglang``) is importable here:
    engine benchmarks run real engine servers with this interpreter."""
    import importlib.util

    if importlib.util.find_spec(engine) is None:
        raise KvtierError(f"kvtier bench {command} runs real {engine} servers, and {engine} is not installed in "
                          f"this interpreter ({sys.executable}); run it from {engine}'s environment, e.g. "
                          f".venv-{engine}/bin/kvtier bench {command} (scripts/install-{engine}.sh makes it)")


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


def paired(ours: list[float], baseline: list[float]) -> dict[str, float]:
    """Speed ratio baseline ÷ ours of each run (seconds measured back to back): min / median / max.

    Above 1 means ours was faster. Pairing runs cancels the drift of a shared machine between runs."""
    if len(ours) != len(baseline) or not ours:
        raise ValueError(f"paired ratio needs as many runs on both sides, got {len(ours)} and {len(baseline)}")
    per_run = [b / o for o, b in zip(ours, baseline)]
    return {"min": min(per_run), "median": statistics.median(per_run), "max": max(per_run)}


Cell = str | float | int | bool


@dataclass(frozen=True)
class Row:
    """One measured operation: its timed runs, and the row it is compared with (``vs``), if any."""

    label: str
    seconds: list[float]
    series: str = ""
    vs: Row | None = None
    extra: dict[str, Cell] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.series}: {self.label}" if self.series else self.label


class Report:
    """Rows of repeated timings, each optionally against another row measured in the same run.

    ``amount`` (e.g. gigabytes moved per run) turns seconds into a rate (``unit``, "GB/s"); without it
    rows are shown in ``unit`` "s" or "ms". A row's ``vs`` is its ceiling or baseline row; its ratio is
    :func:`paired` (baseline ÷ ours per run, above 1 = faster than the baseline). With ``goal``, each
    compared row records whether its median ratio reaches it. :meth:`finish` writes
    ``<out>/<name>.json`` (machine info, ``meta``, one entry per row) and ``<out>/<name>.png`` (median
    with min/max whiskers, one bar group per label, one colour per series) and prints the table.
    """

    def __init__(self, name: str, title: str, *, amount: float | None = None, unit: str = "GB/s",
                 goal: float | None = None, meta: dict[str, Any] | None = None) -> None:
        if amount is None and unit not in ("s", "ms"):
            raise ValueError(f"unit {unit!r} needs an amount per run; without one use 's' or 'ms'")
        self.name, self.title, self.amount, self.unit, self.goal = name, title, amount, unit, goal
        self.meta: dict[str, Any] = dict(meta or {})
        self.rows: list[Row] = []

    def add(self, label: str, seconds: list[float], *, vs: Row | None = None, series: str = "",
            **extra: Cell) -> Row:
        """Add a row of timed runs (seconds), compared with ``vs`` (a row added before) when given."""
        if not seconds:
            raise ValueError(f"row {label!r} has no runs")
        if vs is not None and len(vs.seconds) != len(seconds):
            raise ValueError(f"row {label!r} has {len(seconds)} runs, its baseline {vs.name!r} {len(vs.seconds)}")
        row = Row(label, list(seconds), series, vs, dict(extra))
        self.rows.append(row)
        return row

    def values(self, seconds: float) -> float:
        """One run's value in the report's unit."""
        if self.amount is not None:
            return self.amount / seconds
        return seconds * 1e3 if self.unit == "ms" else seconds

    def summary(self, row: Row) -> dict[str, Any]:
        """JSON of one row: seconds and values (min / median / max), ratio against ``vs``, goal."""
        vals = sorted(self.values(s) for s in row.seconds)
        out: dict[str, Any] = {
            "label": row.label, "series": row.series, "runs": row.seconds,
            "seconds": {"min": min(row.seconds), "median": statistics.median(row.seconds), "max": max(row.seconds)},
            self.unit: {"min": vals[0], "median": statistics.median(vals), "max": vals[-1]},
            **row.extra,
        }
        if row.vs is not None:
            out["vs"] = row.vs.name
            out["ratio"] = paired(row.seconds, row.vs.seconds)
            if self.goal is not None:
                out["meets_goal"] = out["ratio"]["median"] >= self.goal
        return out

    def record(self) -> dict[str, Any]:
        return {"title": self.title, "unit": self.unit, "amount": self.amount, "goal": self.goal, **self.meta,
                "rows": [self.summary(r) for r in self.rows]}

    def table(self) -> Any:
        """The rows as a rich Table: values min / median / max, ratio min / median / max, goal, extras."""
        from rich.table import Table

        rows = [self.summary(r) for r in self.rows]
        extras = list(dict.fromkeys(k for r in self.rows for k in r.extra))
        series = any(r.series for r in self.rows)
        table = Table(title=self.title)
        for col in (*(["series"] if series else []), "operation", f"{self.unit} min", "median", "max", "vs",
                    "ratio min", "median", "max", *([f"≥ {self.goal}"] if self.goal is not None else []), *extras):
            table.add_column(col, justify="left" if col in ("series", "operation", "vs") else "right")
        for row, s in zip(self.rows, rows):
            v, q = s[self.unit], s.get("ratio")
            spread = ("min", "median", "max")
            cells = [*([row.series] if series else []), row.label, *(f"{v[k]:.3g}" for k in spread),
                     row.vs.name if row.vs else "", *((f"{q[k]:.2f}x" for k in spread) if q else ("", "", ""))]
            if self.goal is not None:
                cells.append(("yes" if s["meets_goal"] else "NO") if q else "")
            cells += [_cell(row.extra.get(k, "")) for k in extras]
            table.add_row(*(escape_markup(c) for c in cells))
        return table

    def plot(self, path: Path | str) -> Path:
        labels = list(dict.fromkeys(r.label for r in self.rows))
        names = list(dict.fromkeys(r.series for r in self.rows))
        series: dict[str, list[float]] = {}
        errors: dict[str, tuple[list[float], list[float]]] = {}
        for name in names:
            by_label = {r.label: sorted(self.values(s) for s in r.seconds) for r in self.rows if r.series == name}
            empty = [0.0, 0.0]
            cols = [by_label.get(label, empty) for label in labels]
            key = name or self.unit
            series[key] = [statistics.median(c) for c in cols]
            errors[key] = ([c[0] for c in cols], [c[-1] for c in cols])
        return bar_plot(path, self.title, labels, series, f"{self.unit} (median, min/max whiskers)", errors)

    def finish(self, out_dir: Path | str = "results", *, show: bool = True) -> dict[str, Any]:
        """Write the JSON and PNG under ``out_dir``, print the table (``show``); return the record."""
        record = self.record()
        path = write_results(self.name, record, out_dir)
        png = self.plot(path.with_suffix(".png"))
        if show:
            from rich.console import Console

            console = Console(width=max(Console().width, 140))
            console.print(self.table())
            console.print(f"wrote {path} and {png}")
        return record


def _cell(value: Cell) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def escape_markup(text: str) -> str:
    """Cell text shown verbatim by rich (labels such as ``zstd[shuffle=on]`` are not markup)."""
    from rich.markup import escape

    return escape(text)


def show_table(title: str, columns: list[str], rows: list[list[Cell]], *, width: int = 120) -> None:
    """Print a table of already computed values (quality benchmarks whose rows are not timings)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape_markup(_cell(c)) for c in row))
    Console(width=max(Console().width, width)).print(table)
