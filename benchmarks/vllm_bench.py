"""long-doc-qa against vLLM's OpenAI endpoint: TTFT with kvtier vs vLLM alone (prefix cache off / on).

Each configuration gets a fresh server (``kvtier serve``'s command line). Round 1 (warm-up) sends every
document once with a question; round 2 (query) sends every document again with another question, so
its whole document prefix is reusable. TTFT is measured on streamed completions (temperature 0). The
ratio printed is vLLM-alone query TTFT ÷ kvtier query TTFT, both measured in this run.

    .venv-vllm/bin/python benchmarks/vllm_bench.py --doc-tokens 2000 --docs 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvtier.bench.common import bar_plot, stop_process, write_results
from kvtier.integrations.vllm_cli import server_command, server_env

MODEL_NAME = "bench-model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError("server did not become ready")


def ttft(port: int, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(time to first streamed token, total time) of one completion, seconds."""
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if first is None and json.loads(line[5:])["choices"][0].get("text"):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (first if first is not None else total), total


def documents(count: int, words: int) -> list[str]:
    """Synthetic documents as in long-doc-qa ("<i> hi hi ..."), made distinct per document."""
    return [f"Document {i}: " + " ".join(f"hi{(i * 13 + j) % 7}" for j in range(words)) for i in range(count)]


def run_config(name: str, kvtier: bool, prefix_caching: bool, docs: list[str], args: argparse.Namespace,
               workdir: Path) -> dict[str, Any]:
    port = _free_port()
    overrides = {"cpu": {"capacity": args.cpu_capacity}, "chunk_tokens": args.chunk_tokens}
    argv = server_command(args.model, port=port, overrides=overrides, max_model_len=args.max_model_len,
                          served_model_name=MODEL_NAME, prefix_caching=prefix_caching, kvtier=kvtier)
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, proc, args.start_timeout)
        ttft(port, "Hello", 2)  # first request pays one-off warm-up costs
        warm = [ttft(port, d + "\nQuestion: how many words are there?\nAnswer:", args.output_len) for d in docs]
        query = [ttft(port, d + "\nQuestion: which word comes last?\nAnswer:", args.output_len) for d in docs]
    finally:
        stop_process(proc, 30)
        log.close()
    result: dict[str, Any] = {
        "warmup_ttft_s": [w[0] for w in warm], "query_ttft_s": [q[0] for q in query],
        "warmup_total_s": [w[1] for w in warm], "query_total_s": [q[1] for q in query],
    }
    result["warmup_ttft_mean_s"] = statistics.mean(result["warmup_ttft_s"])
    result["query_ttft_mean_s"] = statistics.mean(result["query_ttft_s"])
    print(f"{name:>22}: warm-up TTFT {result['warmup_ttft_mean_s']:.3f}s, query TTFT "
          f"{result['query_ttft_mean_s']:.3f}s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2)")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--doc-words", type=int, default=1000, help="≈2 tokens per word")
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--cpu-capacity", default="2GiB")
    p.add_argument("--chunk-tokens", type=int, default=128,
                   help="kvtier chunk size; 128 = vLLM's CPU block size, so hits end where vLLM's own would")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--out", default="results")
    p.add_argument("--configs", default="vllm,vllm+prefix,kvtier",
                   help="comma list of: vllm, vllm+prefix, kvtier, kvtier+prefix")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    docs = documents(args.docs, args.doc_words)
    table = {"vllm": (False, False), "vllm+prefix": (False, True), "kvtier": (True, False),
             "kvtier+prefix": (True, True)}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-vllm-bench-") as tmp:
        for name in args.configs.split(","):
            kv, prefix = table[name]
            results[name] = run_config(name, kv, prefix, docs, args, Path(tmp))
    summary: dict[str, Any] = {"configs": results, "params": vars(args)}
    if "vllm" in results and "kvtier" in results:
        gain = results["vllm"]["query_ttft_mean_s"] / results["kvtier"]["query_ttft_mean_s"]
        summary["kvtier_query_ttft_gain_vs_vllm"] = gain
        print(f"kvtier query TTFT is {gain:.1f}x lower than vLLM alone (goal: >= 5x)")
    path = write_results("vllm_long_doc_qa", summary, args.out)
    names = list(results)
    bar_plot(Path(args.out) / "vllm_long_doc_qa.png", "long-doc-qa TTFT (mean, s)", names,
             {"warm-up": [results[n]["warmup_ttft_mean_s"] for n in names],
              "query": [results[n]["query_ttft_mean_s"] for n in names]}, "seconds")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
