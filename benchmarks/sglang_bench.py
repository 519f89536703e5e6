"""kvtier under SGLang: page objects vs batched chunks on the tiers, and TTFT cold vs kvtier hit.

``storage`` (no SGLang needed): SGLang hands kvtier pages (16 tokens = 360 KiB for SmolLM2-135M). One
SGLang storage batch (128 pages) is written and read back through the disk tier as page objects (what
the adapter does, measured through the adapter itself and at the tier) and as chunks of N pages
(the alternative), with fsync on and off. The ceiling is a plain ``copy_`` of the same bytes.

``ttft`` (SGLang test venv): one SGLang server with kvtier (disk tier); per prompt size, ``--repeat``
distinct prompts are sent cold (a kvtier miss: full prefill), then after ``/flush_cache`` (SGLang's
device and host caches emptied) sent again: a kvtier hit, as SGLang's ``cached_tokens_details``
confirms. TTFT = latency of a greedy 1-token ``/generate``. Ratio = cold ÷ hit. The ceiling, measured
in between, is SGLang's own device (radix-cache) hit on the same prompt: no copy at all, so
``hit ÷ device hit`` is what kvtier's L3 path costs on top of SGLang's cached-prefix step.

    .venv/bin/python benchmarks/sglang_bench.py storage
    .venv-sglang/bin/python benchmarks/sglang_bench.py ttft --sizes 1024,2048 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kvtier.bench.common import Timing, bar_plot, free_port, time_runs, write_results
from kvtier.config import load_config
from kvtier.frames import pack_parts, unpack_into
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord, Kind
from kvtier.storage.base import Tier
from kvtier.storage.factory import build_tiers

PAGE = 16
SMOLLM2 = {"layers": 30, "heads": 3, "dim": 64}


# ---- storage: page objects vs chunks --------------------------------------------------------------
def _disk(path: Path, fsync: bool, spec: KVSpec) -> Tier:
    config = load_config(None, overrides={"disk": {"enabled": True, "path": str(path), "fsync": fsync}})
    return build_tiers(config, spec)[0][0]


def _tier_round(pages: torch.Tensor, pages_per_object: int, path: Path, fsync: bool,
                repeat: int) -> dict[str, Any]:
    """Write then read ``pages`` ([n, layers, 2, page, heads, dim]) as objects of ``pages_per_object``."""
    n, page = pages.shape[0], pages.shape[3]
    spec = KVSpec(pages.shape[1], pages.shape[4], pages.shape[5], "bfloat16", page * pages_per_object)
    objects = [torch.cat(list(pages[i : i + pages_per_object]), dim=2).contiguous()
               for i in range(0, n, pages_per_object)]
    records = [ChunkRecord(i.to_bytes(16, "little"), bytes(16), i.to_bytes(32, "little"), Kind.PAGE, spec.chunk_tokens)
               for i in range(len(objects))]  # page objects, as the adapter stores them
    tier = _disk(path, fsync, spec)
    out = torch.empty(spec.chunk_shape(), dtype=spec.torch_dtype)

    def write() -> None:
        for record, kv in zip(records, objects):
            tier.put_parts(record.key, pack_parts(record, kv, spec))

    def read() -> None:
        for record in records:
            frame = tier.get(record.key)
            assert frame is not None
            unpack_into(frame, spec, out, expect=record.key)

    w = time_runs(write, repeat=repeat, warmup=1, setup=tier.clear)
    r = time_runs(read, repeat=repeat, warmup=1)
    tier.close()
    return _io_result(w, r, pages.numel() * pages.element_size(), len(objects))


def _adapter_round(pages: torch.Tensor, path: Path, fsync: bool, repeat: int) -> dict[str, Any]:
    """The same pages through :class:`KvtierStorage` (page objects, the shipped code path)."""
    from kvtier.integrations.sglang.backend import KvtierStorage

    n, layers, _two, page, heads, dim = pages.shape
    pool = SimpleNamespace(layout="layer_first", kv_buffer=pages.permute(2, 1, 0, 3, 4, 5).reshape(
        2, layers, n * page, heads, dim).contiguous(), page_size=page, layer_num=layers, head_num=heads,
        head_dim=dim, dtype=pages.dtype)
    config = SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=False, model_name="bench",
                             extra_config={"kvtier": {"disk": {"enabled": True, "path": str(path), "fsync": fsync}}})
    storage = KvtierStorage(config)
    storage.register_mem_pool_host(pool)
    keys = [f"{i:064x}" for i in range(n)]
    slots = torch.arange(n * page)
    w = time_runs(lambda: storage.batch_set_v1(keys, slots), repeat=repeat, warmup=1, setup=storage.clear)
    r = time_runs(lambda: storage.batch_get_v1(keys, slots), repeat=repeat, warmup=1)
    assert all(storage.batch_get_v1(keys, slots))
    storage.close()
    return _io_result(w, r, pages.numel() * pages.element_size(), n)


def _io_result(write: Timing, read: Timing, nbytes: int, calls: int) -> dict[str, Any]:
    return {"objects": calls, "bytes": nbytes, "write": write.summary(), "read": read.summary(),
            "write_GBps": write.rate(nbytes / 1e9), "read_GBps": read.rate(nbytes / 1e9)}


def _storage_name(args: argparse.Namespace) -> str:
    """Results name: ``sglang_storage`` for the default 16-token pages, else with the page size."""
    return "sglang_storage" if args.page_tokens == PAGE else f"sglang_storage_page{args.page_tokens}"


def storage_bench(args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    shape = (args.pages, SMOLLM2["layers"], 2, args.page_tokens, SMOLLM2["heads"], SMOLLM2["dim"])
    pages = torch.randn(shape, generator=g).to(torch.bfloat16)
    nbytes = pages.numel() * pages.element_size()
    dst = torch.empty_like(pages)
    ceiling = time_runs(lambda: dst.copy_(pages), repeat=args.repeat)
    results: dict[str, Any] = {"page_bytes": nbytes // args.pages, "pages": args.pages, "page_tokens": args.page_tokens,
                               "ceiling_copy": {**ceiling.summary(), "GBps": ceiling.rate(nbytes / 1e9)},
                               "runs": {}}
    with tempfile.TemporaryDirectory(prefix="kvtier-sglang-bench-", dir=args.disk_dir) as tmp:
        for fsync in (False, True):
            label = "fsync" if fsync else "no-fsync"
            runs: dict[str, Any] = {"adapter, page objects": _adapter_round(pages, Path(tmp) / f"a-{label}",
                                                                            fsync, args.repeat)}
            for n in (1, 4, 16):
                name = "tier, page objects" if n == 1 else f"tier, chunks of {n} pages"
                runs[name] = _tier_round(pages, n, Path(tmp) / f"t{n}-{label}", fsync, args.repeat)
            results["runs"][label] = runs
    for label, runs in results["runs"].items():
        for name, r in runs.items():
            r["write_vs_copy"] = ceiling.median / r["write"]["median_s"]
            r["read_vs_copy"] = ceiling.median / r["read"]["median_s"]
            print(f"{label:9} {name:26} {r['objects']:4} objects  write {r['write_GBps']['median']:.2f} GB/s "
                  f"(min {r['write_GBps']['min']:.2f}, max {r['write_GBps']['max']:.2f})  read "
                  f"{r['read_GBps']['median']:.2f} GB/s (min {r['read_GBps']['min']:.2f}, max "
                  f"{r['read_GBps']['max']:.2f})  ratio vs copy w {r['write_vs_copy']:.3f} r {r['read_vs_copy']:.3f}")
    print(f"ceiling: copy_ {results['ceiling_copy']['GBps']['median']:.2f} GB/s")
    labels = [f"{label}\n{name}" for label, runs in results["runs"].items() for name in runs]
    flat = [r for runs in results["runs"].values() for r in runs.values()]
    bar_plot(Path(args.out) / f"{_storage_name(args)}.png", f"{args.pages} SGLang pages of {args.page_tokens} tokens "
             f"({nbytes / 2**20:.0f} MiB) "
             "through the disk tier (GB/s, median, min-max)", labels,
             {"write": [r["write_GBps"]["median"] for r in flat], "read": [r["read_GBps"]["median"] for r in flat]},
             "GB/s", {"write": ([r["write_GBps"]["min"] for r in flat], [r["write_GBps"]["max"] for r in flat]),
                      "read": ([r["read_GBps"]["min"] for r in flat], [r["read_GBps"]["max"] for r in flat])})
    return results


# ---- ttft: SGLang cold vs kvtier hit ---------------------------------------------------------------
def _prompts(sizes: list[int], repeat: int) -> dict[int, list[list[int]]]:
    """``repeat`` distinct prompts per size: a different leading line makes every page hash differ."""
    from transformers import AutoTokenizer

    from kvtier.models import ensure_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))
    text = (Path(__file__).parents[1] / "kvtier" / "data" / "longdoc.txt").read_text()
    body = list(tokenizer(text)["input_ids"])
    out: dict[int, list[list[int]]] = {}
    for size in sizes:
        out[size] = []
        for i in range(repeat):
            head = list(tokenizer(f"Document {size}-{i}. Read it and answer.\n")["input_ids"])
            out[size].append((head + body)[:size])
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"min_s": min(values), "median_s": statistics.median(values), "max_s": max(values), "runs": len(values)}


def ttft_bench(args: argparse.Namespace) -> dict[str, Any]:
    from kvtier.integrations.sglang.cli import flush_cache, generate, running_server, sglang_server_command

    sizes = [int(s) for s in args.sizes.split(",")]
    prompts = _prompts(sizes, args.repeat)
    results: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="kvtier-sglang-ttft-", dir=args.disk_dir) as tmp:
        cfg = Path(tmp) / "kvtier.yaml"
        cfg.write_text(f"disk:\n  enabled: true\n  path: {Path(tmp) / 'disk'}\n")
        argv = sglang_server_command(port=free_port(), config=str(cfg), prefetch_threshold=PAGE,
                                     cpu_test_rig=True)
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
                    _wait_backed_up(Path(tmp) / "disk", url, ids)
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
                r = {"cold": _spread(cold), "kvtier_hit": _spread(hit), "device_hit": _spread(device),
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
    labels = [f"{s} tokens" for s in results["sizes"]]
    series = {name: [results["sizes"][s][key]["median_s"] for s in results["sizes"]]
              for name, key in (("cold", "cold"), ("kvtier hit", "kvtier_hit"), ("SGLang device hit", "device_hit"))}
    errors = {name: ([results["sizes"][s][key]["min_s"] for s in results["sizes"]],
                     [results["sizes"][s][key]["max_s"] for s in results["sizes"]])
              for name, key in (("cold", "cold"), ("kvtier hit", "kvtier_hit"), ("SGLang device hit", "device_hit"))}
    bar_plot(Path(args.out) / "sglang_ttft.png", "SGLang TTFT: cold vs kvtier hit (median, min-max)", labels,
             series, "seconds", errors)
    return results


def _wait_backed_up(disk: Path, url: str, ids: list[int], timeout_s: float = 120.0) -> None:
    """SGLang writes pages to storage on its own thread after the request: wait until the files stop
    growing in number (the whole prompt is then on disk)."""
    want = len(ids) // PAGE
    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        count = sum(1 for _ in disk.glob("??/*.kvt"))
        if count == seen and count >= want:
            return
        seen = count
        time.sleep(1.0)


def _fmt(s: dict[str, float]) -> str:
    return f"median {s['median_s']:.2f} s (min {s['min_s']:.2f}, max {s['max_s']:.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("storage", "ttft"))
    p.add_argument("--pages", type=int, default=128, help="storage: pages per round (one SGLang batch)")
    p.add_argument("--page-tokens", type=int, default=PAGE, help="storage: tokens per SGLang page (--page-size)")
    p.add_argument("--sizes", default="1024,2048", help="ttft: prompt sizes in tokens")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--disk-dir", default=None, help="where the disk tier lives (default: the temp dir)")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    data = storage_bench(args) if args.part == "storage" else ttft_bench(args)
    data.update(params=vars(args), load_average={"before": load_before, "after": os.getloadavg()})
    path = write_results(_storage_name(args) if args.part == "storage" else "sglang_ttft", data, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
