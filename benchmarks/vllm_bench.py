"""long-doc-qa and multi-round-qa against vLLM's OpenAI endpoint: kvtier vs vLLM alone (prefix cache off / on).

Each configuration gets a fresh server (``kvtier serve``'s command line); TTFT is measured on streamed
completions (temperature 0). Ratios are against vLLM alone measured in the same run and, for kvtier,
against vLLM's own prefix-cache hit on the same prompts (``vs_prefix_cache``: kvtier TTFT ÷ prefix-cache
TTFT per prompt, min/median/max; goal <= 1.1). The hit rates are
vLLM's own counters (``vllm:prefix_cache_*`` = vLLM's prefix cache, ``vllm:external_prefix_cache_*`` =
kvtier). The JSON records the machine's load average (this machine is shared).

    .venv-vllm/bin/python benchmarks/vllm_bench.py --docs 3 --doc-words 1000
    .venv-vllm/bin/python benchmarks/vllm_bench.py --workload multi-round-qa --users 4 --rounds 3 \
        --configs vllm,vllm+prefix,kvtier,kvtier+prefix
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvtier.bench.common import bar_plot, free_port, stop_process, wait_healthy, write_results
from kvtier.integrations.vllm.cli import server_command, server_env

MODEL_NAME = "bench-model"


def stream(port: int, prompt: str, max_tokens: int) -> tuple[float, float, str, dict[str, int]]:
    """One streamed greedy completion: (time to first token, total time, text, token usage), seconds."""
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    text: list[str] = []
    usage: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = {k: int(event["usage"][k]) for k in usage}
            piece = event["choices"][0].get("text") if event.get("choices") else None
            if piece:
                first = first if first is not None else time.perf_counter() - start
                text.append(piece)
    total = time.perf_counter() - start
    return (first if first is not None else total), total, "".join(text), usage


def ttft(port: int, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(time to first streamed token, total time) of one completion, seconds."""
    first, total, _text, _usage = stream(port, prompt, max_tokens)
    return first, total


def documents(count: int, words: int) -> list[str]:
    """Synthetic documents as in long-doc-qa ("<i> hi hi ..."), made distinct per document."""
    return [f"Document {i}: " + " ".join(f"hi{(i * 13 + j) % 7}" for j in range(words)) for i in range(count)]


@contextlib.contextmanager
def serve(name: str, kvtier: bool, prefix_caching: bool, args: argparse.Namespace, workdir: Path) -> Iterator[int]:
    """A fresh server (``kvtier serve``'s command line) for one configuration; yields its port."""
    port = free_port()
    overrides = {"cpu": {"capacity": args.cpu_capacity}, "chunk_tokens": args.chunk_tokens}
    argv = server_command(args.model, port=port, overrides=overrides, max_model_len=args.max_model_len,
                          served_model_name=MODEL_NAME, prefix_caching=prefix_caching, kvtier=kvtier)
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    # its own process group: vLLM's engine-core and worker processes go with it, even when the server
    # is stopped before it finished starting (they outlived it then)
    proc = subprocess.Popen(argv, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, args.start_timeout)
        ttft(port, "Hello", 2)  # first request pays one-off warm-up costs
        yield port
    finally:
        stop_process(proc, 30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def long_doc_qa(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Round 1 (warm-up) sends every document once; round 2 (query) sends each again with another
    question, so its whole document prefix is reusable."""
    docs = documents(args.docs, args.doc_words)
    warm = [ttft(port, d + "\nQuestion: how many words are there?\nAnswer:", args.output_len) for d in docs]
    query = [ttft(port, d + "\nQuestion: which word comes last?\nAnswer:", args.output_len) for d in docs]
    result: dict[str, Any] = {
        "warmup_ttft_s": [w[0] for w in warm], "query_ttft_s": [q[0] for q in query],
        "warmup_total_s": [w[1] for w in warm], "query_total_s": [q[1] for q in query],
    }
    result["warmup_ttft_mean_s"] = statistics.mean(result["warmup_ttft_s"])
    result["query_ttft_mean_s"] = statistics.mean(result["query_ttft_s"])
    print(f"  warm-up TTFT {result['warmup_ttft_mean_s']:.3f}s, query TTFT {result['query_ttft_mean_s']:.3f}s",
          flush=True)
    return result


def multi_round_qa(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """``--users`` users chat at once, ``--rounds`` rounds each: every round resends the user's whole
    history (a shared system prompt, the user's own context, earlier questions and the model's answers)
    plus a new question; a user sends the next round when the answer arrives."""
    system = "System: you answer questions about lists. " + documents(1, args.system_words)[0]
    contexts = documents(args.users + 1, args.history_words)[1:]

    def user(u: int) -> list[dict[str, Any]]:
        history = f"{system}\nUser {u} shares: {contexts[u]}\n"
        rounds = []
        for r in range(args.rounds):
            history += f"User: question {r}: which word comes after the {r + 1}th one?\nAssistant:"
            first, total, text, usage = stream(port, history, args.answer_len)
            rounds.append({"user": u, "round": r, "ttft_s": first, "total_s": total, **usage})
            history += text + "\n"
        return rounds

    start = time.perf_counter()
    with ThreadPoolExecutor(args.users) as pool:
        requests = [req for rounds in pool.map(user, range(args.users)) for req in rounds]
    wall = time.perf_counter() - start
    ttfts = [req["ttft_s"] for req in requests]
    prompt_tokens = sum(req["prompt_tokens"] for req in requests)
    result = {
        "requests": requests, "wall_s": wall, "ttft": _spread(ttfts),
        "ttft_by_round": {r: _spread([q["ttft_s"] for q in requests if q["round"] == r]) for r in range(args.rounds)},
        "requests_per_s": len(requests) / wall, "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": prompt_tokens / wall,
        "output_tokens_per_s": sum(req["completion_tokens"] for req in requests) / wall,
    }
    t = result["ttft"]
    print(f"  TTFT min/median/max {t['min_s']:.2f}/{t['median_s']:.2f}/{t['max_s']:.2f}s, "
          f"{result['requests_per_s']:.3f} req/s, {result['prompt_tokens_per_s']:.0f} prompt tok/s", flush=True)
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"min_s": min(values), "median_s": statistics.median(values), "max_s": max(values)}


def hit_rates(port: int) -> dict[str, float]:
    """vLLM's own prefix-cache counters (local and external = kvtier) from ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "_total"))

    out: dict[str, float] = {}
    for kind, prefix in (("local", "vllm:prefix_cache"), ("external", "vllm:external_prefix_cache")):
        hits, queries = total(f"{prefix}_hits"), total(f"{prefix}_queries")
        out[f"{kind}_hit_tokens"] = hits
        out[f"{kind}_query_tokens"] = queries
        out[f"{kind}_hit_rate"] = hits / queries if queries else 0.0
    return out


WORKLOADS = {"long-doc-qa": long_doc_qa, "multi-round-qa": multi_round_qa}
CONFIGS = {"vllm": (False, False), "vllm+prefix": (False, True), "kvtier": (True, False),
           "kvtier+prefix": (True, True)}


def _ratios(values: list[float], ceiling: list[float]) -> dict[str, float]:
    """min/median/max of ``values[i] / ceiling[i]`` (the same prompt under two configurations)."""
    ratios = [v / c for v, c in zip(values, ceiling)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def _later_ttfts(res: dict[str, Any]) -> list[float]:
    """multi-round-qa TTFTs of rounds 2+ (their history is reusable), ordered by (user, round)."""
    return [q["ttft_s"] for q in sorted(res["requests"], key=lambda q: (q["user"], q["round"])) if q["round"] > 0]


def _report(workload: str, results: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the same-run configurations: vLLM alone (``gain`` > 1: faster than it) and, for
    kvtier, vLLM's own prefix-cache hit on the same prompts (``vs_prefix_cache`` < 1: faster than it;
    the goal is <= 1.1)."""
    out: dict[str, Any] = {}
    base, ceiling = results.get("vllm"), results.get("vllm+prefix")
    for name, res in results.items():
        row: dict[str, Any] = {}
        if workload == "long-doc-qa":
            if base is not None and name != "vllm":
                row["query_ttft_gain"] = base["query_ttft_mean_s"] / res["query_ttft_mean_s"]
            if ceiling is not None and name.startswith("kvtier"):
                row["query_ttft_vs_prefix_cache"] = _ratios(res["query_ttft_s"], ceiling["query_ttft_s"])
        else:
            if base is not None and name != "vllm":
                later = [r for r in res["ttft_by_round"] if int(r) > 0]
                row["median_ttft_gain"] = base["ttft"]["median_s"] / res["ttft"]["median_s"]
                row["later_rounds_median_ttft_gain"] = (
                    statistics.median([base["ttft_by_round"][r]["median_s"] for r in later])
                    / statistics.median([res["ttft_by_round"][r]["median_s"] for r in later])) if later else 0.0
                row["throughput_gain"] = res["prompt_tokens_per_s"] / base["prompt_tokens_per_s"]
            if ceiling is not None and name.startswith("kvtier") and _later_ttfts(res):
                row["later_rounds_ttft_vs_prefix_cache"] = _ratios(_later_ttfts(res), _later_ttfts(ceiling))
        if row:
            out[name] = row
            print(f"{name}: " + ", ".join(
                f"{k} {v['min']:.2f}/{v['median']:.2f}/{v['max']:.2f} (min/median/max)" if isinstance(v, dict)
                else f"{k} {v:.2f}x" for k, v in row.items()), flush=True)
    return out


def _plot(workload: str, results: dict[str, Any], out: Path) -> None:
    names = list(results)
    stem = workload.replace("-", "_")
    if workload == "long-doc-qa":
        bar_plot(out / f"vllm_{stem}.png", "long-doc-qa TTFT (mean, s)", names,
                 {"warm-up": [results[n]["warmup_ttft_mean_s"] for n in names],
                  "query": [results[n]["query_ttft_mean_s"] for n in names]}, "seconds")
        return
    rounds = sorted(results[names[0]]["ttft_by_round"])
    series = {f"round {r + 1}": [results[n]["ttft_by_round"][r]["median_s"] for n in names] for r in rounds}
    errors = {f"round {r + 1}": ([results[n]["ttft_by_round"][r]["min_s"] for n in names],
                                 [results[n]["ttft_by_round"][r]["max_s"] for n in names]) for r in rounds}
    bar_plot(out / f"vllm_{stem}.png", "multi-round-qa TTFT per round (median, min-max)", names, series,
             "seconds", errors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="long-doc-qa")
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2)")
    p.add_argument("--docs", type=int, default=3, help="long-doc-qa: documents")
    p.add_argument("--doc-words", type=int, default=1000, help="long-doc-qa: ≈2 tokens per word")
    p.add_argument("--output-len", type=int, default=8, help="long-doc-qa: tokens generated per request")
    p.add_argument("--users", type=int, default=4, help="multi-round-qa: users chatting at once")
    p.add_argument("--rounds", type=int, default=3, help="multi-round-qa: rounds per user")
    p.add_argument("--system-words", type=int, default=150, help="multi-round-qa: shared system prompt (≈2 tok/word)")
    p.add_argument("--history-words", type=int, default=350, help="multi-round-qa: each user's own context")
    p.add_argument("--answer-len", type=int, default=32, help="multi-round-qa: tokens per answer")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--cpu-capacity", default="2GiB")
    p.add_argument("--chunk-tokens", type=int, default=128,
                   help="kvtier chunk size; 128 = vLLM's CPU block size, so hits end where vLLM's own would")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", default="results")
    p.add_argument("--configs", default="vllm,vllm+prefix,kvtier",
                   help="comma list of: " + ", ".join(CONFIGS))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    workload = WORKLOADS[args.workload]
    results: dict[str, Any] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvtier-vllm-bench-") as tmp:
        for name in args.configs.split(","):
            kv, prefix = CONFIGS[name]
            print(f"{name}:", flush=True)
            with serve(name, kv, prefix, args, Path(tmp)) as port:
                results[name] = workload(port, args)
                results[name]["cache"] = hit_rates(port)
            cache = results[name]["cache"]
            print(f"  hit rate: vLLM prefix cache {cache['local_hit_rate']:.1%}, "
                  f"kvtier {cache['external_hit_rate']:.1%}", flush=True)
    summary: dict[str, Any] = {"workload": args.workload, "configs": results, "params": vars(args),
                               "vs_vllm_alone": _report(args.workload, results),
                               "load_average": {"before": load_before, "after": os.getloadavg()}}
    stem = args.workload.replace("-", "_")
    path = write_results(f"vllm_{stem}", summary, args.out)
    _plot(args.workload, results, Path(args.out))
    print(f"wrote {path} (load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
