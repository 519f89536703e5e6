"""``kvtier bench sglang``: kvtier under SGLang, through its HiCache storage backend.

``storage`` (no SGLang needed): one SGLang storage batch (``--pages`` pages of ``--page-tokens`` tokens,
SmolLM2-135M geometry: 360 KiB per 16-token page) is written (``batch_set_v1``) and read back
(``batch_get_v1``) through :class:`~kvtier.integrations.sglang.backend.KvtierStorage` and the disk
tier, with SGLang's prefix keys, as SGLang calls it. Rows: one page per object (the backend before
multi-page objects) and ``--pages-per-object`` (default: the backend's "auto"), each with disk fsync
off and on. The ceiling is a plain ``copy_`` of the same bytes in the same run; ratios are reported
against it and between the two object sizes (min / median / max over ``--repeat`` runs). A second
ceiling is the one copy the backend cannot avoid: the whole batch gathered from SGLang's host pool
into kvtier's canonical layout (writes) and scattered back (reads), single-threaded, as the backend
copies (``pool gather`` / ``pool scatter``; each row's ``vs_pool_copy``).
``--baseline NAME=DIR`` (repeatable) adds another kvtier checkout's backend (e.g. the one-page-per-object
backend: ``git archive c3c4a65 kvtier | tar -x -C DIR``) in a child process, interleaved run by run with
the others on the same batch; the multi-page rows are reported ÷ each baseline, paired per run. Before
every backend op (untimed) the page cache's dirty pages go to disk (:func:`os.sync`): without it an op
paid for the kernel's writeback of the writes before it (up to ~200 MiB a run from the other rows), a
cost that fell on whichever op ran next, not on the one that wrote.

``ttft`` (SGLang test venv): one SGLang server with kvtier (disk tier); per prompt size, ``--repeat``
distinct prompts are sent cold (a kvtier miss: full prefill), then after ``/flush_cache`` (SGLang's
device and host caches emptied) sent again: a kvtier hit, as SGLang's ``cached_tokens_details``
confirms. TTFT = latency of a greedy 1-token ``/generate``. Ratio = cold ÷ hit. The ceiling, measured
in between, is SGLang's own device (radix-cache) hit on the same prompt: no copy at all, so
``hit ÷ device hit`` is what kvtier's L3 path costs on top of SGLang's cached-prefix step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

PAGE = 16
SMOLLM2 = {"layers": 30, "heads": 3, "dim": 64}


# ---- storage: through the backend -----------------------------------------------------------------
def page_hashes(pages: int, page_tokens: int, seed: int = 0) -> list[str]:
    """SGLang's page hashes of a prompt of ``pages`` pages: sha256(previous digest || page tokens)."""
    out, prev = [], b""
    for p in range(pages):
        tokens = [seed * 1_000_003 + p * page_tokens + t for t in range(page_tokens)]
        prev = hashlib.sha256(prev + struct.pack(f"<{page_tokens}I", *tokens)).digest()
        out.append(prev.hex())
    return out


def _backend(pool: SimpleNamespace, path: Path, fsync: bool, pages_per_object: int | str) -> Any:
    from kvtier.integrations.sglang.backend import KvtierStorage

    config = SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=False, model_name="bench",
                             extra_config={"kvtier": {"disk": {"enabled": True, "path": str(path), "fsync": fsync}},
                                           "kvtier_pages_per_object": pages_per_object})
    storage = KvtierStorage(config)
    storage.register_mem_pool_host(pool)
    return storage


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


KINDS = (("1 page per object", 1), ("multi-page objects", None))  # None: --pages-per-object


def _cleared(storage: Any) -> None:
    """Untimed before a write: the backend emptied and every dirty page on disk (:func:`os.sync`, as
    before every backend op), so no op pays for the kernel's writeback of the op before it."""
    storage.clear()
    os.sync()
WARMUP = 1  # untimed first run of every op (interleaved's default)


class Baseline:
    """Another kvtier checkout's backend in a child process (:mod:`kvtier.bench.sglang_baseline`) on the
    same batch. Keeps the seconds the child measured around each call (no pipe round trip in them)."""

    def __init__(self, name: str, tree: Path, shape: dict[str, int], keys: Path, disk: Path, fsync: bool) -> None:
        from kvtier.errors import ConfigError
        from kvtier.procs import Child

        tree = tree.resolve()
        if not (tree / "kvtier" / "integrations").is_dir():
            raise ConfigError(f"--baseline {name}={tree}: no kvtier/integrations there (a checkout of kvtier)")
        self.name = name
        self.runs: dict[str, list[float]] = {"write": [], "read": []}
        loader = ("import importlib.util as u, sys; s = u.spec_from_file_location('kvtier_sglang_baseline', "
                  "sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); m.main(sys.argv[2:])")
        argv = [sys.executable, "-c", loader, str(Path(__file__).with_name("sglang_baseline.py")),
                "--shape", json.dumps(shape), "--keys", str(keys), "--disk", str(disk), *(["--fsync"] if fsync else [])]
        # cwd = the tree: ``-c`` puts the working directory first on sys.path
        self.child = Child(argv, env={**os.environ, "PYTHONPATH": str(tree)}, stdin=True, cwd=tree,
                           log=disk.with_name(f"{disk.name}.log"))
        try:
            found = Path(self.child.expect(r"^ready (.+)$", 300)[1])
            if tree not in found.parents:
                raise ConfigError(f"--baseline {name}: the child imported kvtier from {found}, not from {tree}")
        except BaseException:
            self.child.stop()
            raise

    def run(self, op: str) -> None:
        self.child.send(op)
        done = self.child.expect(rf"^done {op} (\S+) (True|False)$", 600)
        if done[2] != "True":
            raise RuntimeError(f"baseline {self.name}: {op} did not keep every page (log: {self.child.log_tail()})")
        self.runs[op].append(float(done[1]))

    def close(self) -> None:
        self.child.stop()


def storage_bench(pages: int, page_tokens: int, pages_per_object: int | str, repeat: int,
                  disk_dir: Path | None, baselines: dict[str, Path] | None = None) -> dict[str, Any]:
    """Per fsync setting, the ceiling, each object size's write and read and each baseline's,
    interleaved run by run (:func:`~kvtier.bench.common.interleaved`), so ratios pair runs taken back
    to back."""
    import torch

    from kvtier.bench.common import interleaved, paired
    from kvtier.integrations.sglang.pages import HostPages, PoolView, object_pages

    g = torch.Generator().manual_seed(0)
    layers, heads, dim = SMOLLM2["layers"], SMOLLM2["heads"], SMOLLM2["dim"]
    buffer = torch.randn((2, layers, pages * page_tokens, heads, dim), generator=g).to(torch.bfloat16)
    pool = SimpleNamespace(layout="layer_first", kv_buffer=buffer, page_size=page_tokens, layer_num=layers,
                           head_num=heads, head_dim=dim, dtype=torch.bfloat16)
    nbytes = buffer.numel() * buffer.element_size()
    gb = nbytes / 1e9
    dst = torch.empty_like(buffer)
    host = HostPages(PoolView(pool), [p * page_tokens for p in range(pages)])
    canonical = object_pages(torch.empty((layers, 2, pages * page_tokens, heads, dim), dtype=torch.bfloat16),
                             page_tokens)
    keys = page_hashes(pages, page_tokens)
    slots = torch.arange(pages * page_tokens)
    first_call = SimpleNamespace(prefix_keys=None, extra_info=None)  # SGLang's call at a sequence start
    results: dict[str, Any] = {"pages": pages, "page_tokens": page_tokens, "bytes": nbytes, "rows": {},
                               "baselines": {}}
    shape = {"layers": layers, "heads": heads, "dim": dim, "pages": pages, "page_tokens": page_tokens}
    with tempfile.TemporaryDirectory(prefix="kvtier-sglang-bench-", dir=disk_dir) as tmp:
        (Path(tmp) / "keys").write_text("\n".join(keys))
        for fsync in (False, True):
            sync = "fsync" if fsync else "no fsync"
            ops: dict[str, Any] = {"copy_": lambda: dst.copy_(buffer),
                                   "pool gather": lambda: host.gather(canonical, 0, 0, pages),
                                   "pool scatter": lambda: host.scatter(canonical, 0, 0, pages)}
            prepare: dict[str, Any] = {}
            backends = {}
            others: list[Baseline] = []
            with contextlib.ExitStack() as stack:
                for name, tree in (baselines or {}).items():
                    others.append(Baseline(name, tree, shape, Path(tmp) / "keys", Path(tmp) / f"{sync}-{name}", fsync))
                    stack.callback(others[-1].close)
                    for op in ("write", "read"):
                        ops[f"baseline {name}: {op}"] = functools.partial(others[-1].run, op)
                        prepare[f"baseline {name}: {op}"] = os.sync
                for kind, group in KINDS:
                    st = _backend(pool, Path(tmp) / f"{sync}-{kind}", fsync, group or pages_per_object)
                    backends[kind] = st
                    ops[f"{kind}: write"] = functools.partial(st.batch_set_v1, keys, slots, first_call)
                    prepare[f"{kind}: write"] = functools.partial(_cleared, st)
                    ops[f"{kind}: read"] = functools.partial(st.batch_get_v1, keys, slots, first_call)
                    prepare[f"{kind}: read"] = os.sync
                times = interleaved(ops, repeat, prepare=prepare)
                ceiling = times["copy_"]
            results[f"ceiling copy_ ({sync})"] = {"GBps": _spread([gb / t for t in ceiling]), "runs_s": ceiling}
            pool_copy = {"write": times["pool gather"], "read": times["pool scatter"]}
            results[f"ceiling pool copy ({sync})"] = {op: {"GBps": _spread([gb / t for t in runs]), "runs_s": runs}
                                                      for op, runs in pool_copy.items()}
            for kind, st in backends.items():
                if not all(st.batch_get_v1(keys, slots, first_call)):
                    raise RuntimeError(f"benchmark pages did not read back ({st.stats()})")
                row: dict[str, Any] = {"pages_per_object": st.pages_per_object,
                                       "objects": -(-pages // st.pages_per_object)}
                for op in ("write", "read"):
                    runs = times[f"{kind}: {op}"]
                    row[op] = {"GBps": _spread([gb / t for t in runs]), "runs_s": runs,
                               "vs_copy": paired(runs, ceiling), "vs_pool_copy": paired(runs, pool_copy[op])}
                results["rows"][f"{sync}, {kind}"] = row
                st.close()
            results[f"multi-page ÷ 1 page ({sync})"] = {
                op: paired(times[f"{KINDS[1][0]}: {op}"], times[f"{KINDS[0][0]}: {op}"]) for op in ("write", "read")}
            for other in others:
                row = {}
                for op in ("write", "read"):
                    runs = other.runs[op][WARMUP:]
                    row[op] = {"GBps": _spread([gb / t for t in runs]), "runs_s": runs,
                               "vs_copy": paired(runs, ceiling), "vs_pool_copy": paired(runs, pool_copy[op])}
                results["baselines"][f"{sync}, {other.name}"] = row
                results[f"multi-page ÷ {other.name} ({sync})"] = {
                    op: paired(times[f"{KINDS[1][0]}: {op}"], row[op]["runs_s"]) for op in ("write", "read")}
    return results


def _print_storage(results: dict[str, Any]) -> None:
    def fmt(d: dict[str, float], unit: str) -> str:
        return f"{d['median']:.2f}{unit} ({d['min']:.2f}-{d['max']:.2f})"

    rows = {**{f"{name} (baseline)": r for name, r in results["baselines"].items()}, **results["rows"]}
    for name, r in rows.items():
        print(f"{name:38} " + "  ".join(f"{op} {fmt(r[op]['GBps'], ' GB/s')} ÷ copy_ {fmt(r[op]['vs_copy'], 'x')} "
                                         f"÷ pool copy {fmt(r[op]['vs_pool_copy'], 'x')}" for op in ("write", "read")))
    for sync in ("no fsync", "fsync"):
        c, pool = results[f"ceiling copy_ ({sync})"]["GBps"], results[f"ceiling pool copy ({sync})"]
        print(f"ceilings ({sync}): copy_ {fmt(c, ' GB/s')}, pool gather {fmt(pool['write']['GBps'], ' GB/s')}, "
              f"pool scatter {fmt(pool['read']['GBps'], ' GB/s')}")
        for other in ["1 page", *(name.split(", ", 1)[1] for name in results["baselines"] if name.startswith(sync))]:
            s = results[f"multi-page ÷ {other} ({sync})"]
            print(f"  multi-page ÷ {other}: write {fmt(s['write'], 'x')}, read {fmt(s['read'], 'x')}")


def _plot_storage(results: dict[str, Any], path: Path) -> None:
    from kvtier.bench.common import bar_plot

    named = {**results["rows"], **{f"{name} (baseline)": r for name, r in results["baselines"].items()}}
    rows = list(named.values())
    labels = [name.replace(", ", "\n") for name in named]
    ops = ("write", "read")
    bar_plot(path, f"{results['pages']} SGLang pages of {results['page_tokens']} tokens "
             f"({results['bytes'] / 2**20:.0f} MiB) through KvtierStorage + disk (GB/s, median, min-max)", labels,
             {op: [r[op]["GBps"]["median"] for r in rows] for op in ops}, "GB/s",
             {op: ([r[op]["GBps"]["min"] for r in rows], [r[op]["GBps"]["max"] for r in rows]) for op in ops})


# ---- ttft: SGLang cold vs kvtier hit ---------------------------------------------------------------
def _prompts(sizes: list[int], repeat: int) -> dict[int, list[list[int]]]:
    """``repeat`` distinct prompts per size: a different leading line makes every page hash differ."""
    from transformers import AutoTokenizer

    from kvtier.models import ensure_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))
    text = (Path(__file__).parents[1] / "data" / "longdoc.txt").read_text()
    body = list(tokenizer(text)["input_ids"])
    out: dict[int, list[list[int]]] = {}
    for size in sizes:
        out[size] = []
        for i in range(repeat):
            head = list(tokenizer(f"Document {size}-{i}. Read it and answer.\n")["input_ids"])
            out[size].append((head + body)[:size])
    return out


def _seconds(values: list[float]) -> dict[str, float]:
    return {"min_s": min(values), "median_s": statistics.median(values), "max_s": max(values), "runs": len(values)}


def ttft_bench(sizes: list[int], repeat: int, disk_dir: Path | None, out: Path) -> dict[str, Any]:
    from kvtier.bench.common import bar_plot
    from kvtier.integrations.sglang.cli import flush_cache, generate, running_server, sglang_server_command
    from kvtier.procs import free_port

    prompts = _prompts(sizes, repeat)
    results: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="kvtier-sglang-ttft-", dir=disk_dir) as tmp:
        cfg = Path(tmp) / "kvtier.yaml"
        cfg.write_text(f"disk:\n  enabled: true\n  path: {Path(tmp) / 'disk'}\n")
        argv = sglang_server_command(port=free_port(), config=str(cfg), prefetch_threshold=PAGE, cpu_test_rig=True)
        with running_server(argv, Path(tmp) / "server.log") as url:
            generate(url, [1, 2, 3], 1)  # one-off warm-up
            for size in sizes:
                cold: list[float] = []
                hit: list[float] = []
                device: list[float] = []
                storage_tokens: list[int] = []
                same_text = True
                for ids in prompts[size]:
                    flush_cache(url)
                    start = time.perf_counter()
                    first = generate(url, ids, 1)
                    cold.append(time.perf_counter() - start)
                    _wait_backed_up(Path(tmp) / "disk")
                    start = time.perf_counter()
                    generate(url, ids, 1)  # still in SGLang's device cache: the ceiling
                    device.append(time.perf_counter() - start)
                    flush_cache(url)
                    start = time.perf_counter()
                    second = generate(url, ids, 1)
                    hit.append(time.perf_counter() - start)
                    details = second["meta_info"].get("cached_tokens_details") or {}
                    storage_tokens.append(int(details.get("storage", 0)))
                    same_text &= first["text"] == second["text"]
                r: dict[str, Any] = {
                    "cold": _seconds(cold), "kvtier_hit": _seconds(hit), "device_hit": _seconds(device),
                     "storage_tokens": storage_tokens, "same_greedy_token": same_text,
                     "hit_over_device_hit": statistics.median(hit) / statistics.median(device),
                     "ratio_cold_over_hit": {"median": statistics.median(cold) / statistics.median(hit),
                                             "worst": min(cold) / max(hit), "best": max(cold) / min(hit)}}
                results["sizes"][str(size)] = r
                print(f"{size} tokens: cold TTFT {_fmt(r['cold'])}; kvtier hit {_fmt(r['kvtier_hit'])}; "
                      f"ratio {r['ratio_cold_over_hit']['median']:.1f}x (worst {r['ratio_cold_over_hit']['worst']:.1f}"
                      f", best {r['ratio_cold_over_hit']['best']:.1f}); SGLang device hit {_fmt(r['device_hit'])}, "
                      f"kvtier hit ÷ device hit {r['hit_over_device_hit']:.2f}; storage tokens {storage_tokens}",
                      flush=True)
    kinds = (("cold", "cold"), ("kvtier hit", "kvtier_hit"), ("SGLang device hit", "device_hit"))
    labels = [f"{s} tokens" for s in results["sizes"]]
    series = {name: [results["sizes"][s][key]["median_s"] for s in results["sizes"]] for name, key in kinds}
    errors = {name: ([results["sizes"][s][key]["min_s"] for s in results["sizes"]],
                     [results["sizes"][s][key]["max_s"] for s in results["sizes"]]) for name, key in kinds}
    bar_plot(out / "sglang_ttft.png", "SGLang TTFT: cold vs kvtier hit (median, min-max)", labels, series,
             "seconds", errors)
    return results


def _wait_backed_up(disk: Path, timeout_s: float = 120.0) -> None:
    """SGLang writes pages to storage on its own thread after the request: wait until the number of
    stored objects stops growing."""
    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        count = sum(1 for _ in disk.glob("??/*.kvt"))
        if count == seen and count > 0:
            return
        seen = count
        time.sleep(1.0)


def _baselines(specs: list[str]) -> dict[str, Path]:
    from kvtier.errors import ConfigError

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, tree = spec.partition("=")
        if not sep or not name or not tree or "," in name:
            raise ConfigError(f"--baseline takes NAME=DIR (a kvtier checkout), got {spec!r}")
        out[name] = Path(tree)
    return out


def _fmt(s: dict[str, float]) -> str:
    return f"median {s['median_s']:.2f} s (min {s['min_s']:.2f}, max {s['max_s']:.2f})"


def register(app: typer.Typer) -> None:
    @app.command("sglang")
    def bench_sglang(
        part: Annotated[str, typer.Argument(help="storage (no SGLang needed) or ttft (SGLang's venv).")] = "storage",
        pages: Annotated[int, typer.Option(help="storage: pages per round (one SGLang batch).")] = 128,
        page_tokens: Annotated[int, typer.Option(help="storage: tokens per SGLang page.")] = PAGE,
        pages_per_object: Annotated[str, typer.Option(help="storage: the multi-page rows' object size, "
                                                           "'auto' or 1..128.")] = "auto",
        sizes: Annotated[str, typer.Option(help="ttft: prompt sizes in tokens.")] = "1024,2048",
        repeat: Annotated[int, typer.Option(min=3, help="Runs (min/median/max over them).")] = 5,
        disk_dir: Annotated[Path | None, typer.Option(help="Where the disk tier lives (default: a temp dir).")]
        = None,
        out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
        baseline: Annotated[list[str] | None, typer.Option(
            help="storage: NAME=DIR, another kvtier checkout's backend to time alongside (repeatable; e.g. "
                 "DIR from `git archive c3c4a65 kvtier | tar -x -C DIR`).")] = None,
    ) -> None:
        """SGLang storage write/read GB/s through the backend (1 page vs multi-page objects, fsync off/on,
        ÷ copy_), or SGLang TTFT cold vs kvtier hit vs SGLang's device hit."""
        from kvtier.bench.common import require_engine, write_results
        from kvtier.errors import ConfigError

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        load_before = os.getloadavg()
        if part == "storage":
            group: int | str = pages_per_object if pages_per_object == "auto" else int(pages_per_object)
            data = storage_bench(pages, page_tokens, group, repeat, disk_dir, _baselines(baseline or []))
            _print_storage(data)
            name = "sglang_storage" if page_tokens == PAGE else f"sglang_storage_page{page_tokens}"
            _plot_storage(data, out / f"{name}.png")
        elif part == "ttft":
            require_engine("sglang", "sglang ttft")
            data = ttft_bench([int(s) for s in sizes.split(",")], repeat, disk_dir, out)
            name = "sglang_ttft"
        else:
            raise ConfigError(f"kvtier bench sglang: part must be 'storage' or 'ttft', got {part!r}")
        data.update(params={"part": part, "pages": pages, "page_tokens": page_tokens,
                            "pages_per_object": pages_per_object, "sizes": sizes, "repeat": repeat},
                    load_average={"before": load_before, "after": os.getloadavg()})
        print(f"wrote {write_results(name, data, out)}")
