"""``kvtier bench vllm``: vLLM's OpenAI server with and without kvtier (run it in the vLLM environment).

Every configuration is its own server (``kvtier serve``'s command line, the embedded SmolLM2 in float32
on CPU), all started before the first request and then queried **interleaved**: the same prompt goes to
each configuration in turn (the order rotates from prompt to prompt), one request at a time, so a load
change on a shared machine hits every configuration alike. Every table row is compared pair by pair
(:class:`kvtier.bench.common.Report`: baseline ÷ ours per prompt or repeat, min/median/max, above 1 =
faster than the baseline).

Scenarios (``--scenario``):

- ``long-doc-qa``: each document is sent once (warm-up) and again with another question (query: its
  whole document is reusable). vLLM's own prefix-cache query TTFT ÷ kvtier's (goal >= 1/1.1: kvtier's
  hit at most 1.1x slower).
- ``multi-round-qa``: ``--users`` users chat in lockstep rounds (a shared system prompt, a context of
  their own, earlier questions and answers, one new question); each round runs on every configuration
  in turn, all users at once. Rounds 2+ are compared pair by pair.
- ``async-itl``: three users stream long answers while a fourth sends a ``--doc-words`` prompt stored
  whole before (so its own prefill is one token, like a decoding user's step) whose KV kvtier serves
  from its disk tier (the CPU tier is too small to keep it: later documents evicted it; the files may
  sit in the OS page cache). Inter-token latency of the three during the fourth's load vs the same
  three alone (goal: at most 1.2x, i.e. ratio >= 1/1.2), for ``kvtier_load_async`` false and true, per
  repeat. "During the load" is the span the connector logs for it (its info line
  :data:`~kvtier.integrations.vllm.transfer.LOAD_SPAN_LOG`, on the system-wide monotonic clock the
  streams are timed with): every gap of the three that overlaps it. Each repeat also runs the same
  arrival with a prompt whose KV sits in kvtier's CPU tier (stored just before: no lower-tier read,
  the same copy into vLLM's blocks, the same window definition): "during load vs CPU-tier load" is
  what the disk read itself costs the others, "during CPU-tier load" vs alone what the fourth's
  arrival and the copy cost. The window from the fourth's request to its first token (which adds its
  lookup, its uncached tail's prefill and its first decode step: a batch of four, not three) is
  reported as well, as "until 4th's first token", for both.

``--load-nice 19`` adds ``kvtier-async-nice19`` (the asynchronous loader at that nice value) to async-itl.
``--layerwise`` adds ``kvtier+layerwise`` (``kvtier_layerwise: true``) to the TTFT scenarios.
``--quick`` shrinks every scenario to a smoke run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from kvtier.bench.common import Report, Row, require_engine
from kvtier.integrations.vllm.loader import check_nice
from kvtier.procs import free_port, stop_process, wait_healthy

MODEL_NAME = "bench-model"
#: vLLM 0.32 on CPU with torch 2.13 saves an AOT-compiled model it then fails to load on every later
#: start ("'function' object has no attribute 'finalize_loading'") and compiles again; without AOT
#: compilation a restart reuses torch's own compile caches (same compiled model; docs/vllm.md)
AOT_COMPILE_OFF = ("VLLM_USE_AOT_COMPILE", "0")
SCENARIOS = ("long-doc-qa", "multi-round-qa", "async-itl")


@dataclass(frozen=True)
class Config:
    """One server: kvtier or not, vLLM's prefix cache or not, kvtier overrides and connector keys."""

    name: str
    kvtier: bool
    prefix_caching: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    load_async: bool = False
    load_nice: int | None = None  # the asynchronous loader's nice value (None: the connector's default)
    layerwise: bool = False


@dataclass
class Stream:
    """One streamed greedy completion: send time, one stamp per streamed piece, text, token usage."""

    sent: float
    stamps: list[float]
    text: str
    usage: dict[str, int]

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent

    def gaps(self, skip: int = 0) -> list[tuple[float, float]]:
        """``(start, end)`` of each inter-token gap after the first ``skip`` tokens."""
        s = self.stamps[skip:]
        return list(itertools.pairwise(s))


def stream(port: int, prompt: str, max_tokens: int, on_token: Callable[[int], None] | None = None,
           ignore_eos: bool = False) -> Stream:
    """Send one streamed greedy completion and time every streamed piece."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    sent = time.monotonic()  # the clock the connector logs its load spans with (system-wide)
    stamps: list[float] = []
    text: list[str] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    with urllib.request.urlopen(req, timeout=900) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = {k: int(event["usage"][k]) for k in usage}
            piece = event["choices"][0].get("text") if event.get("choices") else None
            if piece:
                stamps.append(time.monotonic())
                text.append(piece)
                if on_token is not None:
                    on_token(len(stamps))
    if not stamps:
        stamps.append(time.monotonic())
    return Stream(sent, stamps, "".join(text), usage)


def documents(count: int, words: int, first: int = 0) -> list[str]:
    """Synthetic documents as in long-doc-qa ("hi3 hi5 ...", ≈2 tokens per word), distinct per index."""
    return [f"Document {i}: " + " ".join(f"hi{(i * 13 + j) % 7}" for j in range(words))
            for i in range(first, first + count)]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def pair_ratios(values: list[float], ceiling: list[float]) -> dict[str, Any]:
    """min/median/max of ``values[i] / ceiling[i]`` (the same prompt on two configurations)."""
    ratios = [v / c for v, c in zip(values, ceiling)]
    return {**spread(ratios), "pairs": ratios}


def rotated(names: list[str], i: int) -> list[str]:
    """``names`` starting at position ``i`` (so no configuration always goes first)."""
    k = i % len(names)
    return names[k:] + names[:k]


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@contextlib.contextmanager
def servers(configs: list[Config], workdir: Path, model: str | None, max_model_len: int, kv_space_gib: int,
            start_timeout: float) -> Iterator[dict[str, int]]:
    """Start every configuration's server at once; yield ``{name: port}`` once all are healthy. Each
    server is its own process group, so vLLM's engine-core process goes with it even when the server is
    stopped before it finished starting. Each server's output goes to ``<workdir>/<name>.log``."""
    from kvtier.integrations.vllm.cli import server_command, server_env

    started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    env = server_env({**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib)})
    env.setdefault(*AOT_COMPILE_OFF)
    extra_args = ["--seed", "0"]
    if _has_cuda():  # the servers share one GPU
        extra_args += ["--gpu-memory-utilization", f"{0.85 / len(configs):.2f}"]
    try:
        for c in configs:
            port = free_port()
            argv = server_command(model, port=port, overrides=c.overrides or None, max_model_len=max_model_len,
                                  served_model_name=MODEL_NAME, prefix_caching=c.prefix_caching, kvtier=c.kvtier,
                                  load_async=c.load_async, load_nice=c.load_nice, layerwise=c.layerwise,
                                  extra_args=extra_args)
            with (workdir / f"{c.name}.log").open("wb") as log:
                proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started[c.name] = (proc, port)
        for name, (proc, port) in started.items():
            try:
                wait_healthy(f"http://127.0.0.1:{port}", proc, start_timeout)
            except (RuntimeError, TimeoutError) as exc:
                tail = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name}: {exc}\n{tail}") from exc
            stream(port, "Hello", 2)  # the first request pays one-off warm-up costs
        yield {name: port for name, (_proc, port) in started.items()}
    finally:
        for proc, _port in started.values():
            stop_process(proc, 30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


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
        out[f"{kind}_hit_rate"] = hits / queries if queries else 0.0
    return out


# ---- long-doc-qa -------------------------------------------------------------------------------------
def long_doc_qa(ports: dict[str, int], docs: int, doc_words: int, output_len: int) -> dict[str, Any]:
    """Per configuration: warm-up and query TTFT per document, sent interleaved."""
    names = list(ports)
    out: dict[str, Any] = {n: {"warmup_ttft_s": [], "query_ttft_s": []} for n in names}
    for i, doc in enumerate(documents(docs, doc_words)):
        for name in rotated(names, i):
            out[name]["warmup_ttft_s"].append(stream(ports[name], doc + "\nQuestion: how many words?\nAnswer:",
                                                     output_len).ttft)
        for name in rotated(names, i + 1):
            out[name]["query_ttft_s"].append(stream(ports[name], doc + "\nQuestion: which word is last?\nAnswer:",
                                                    output_len).ttft)
        print("  doc", i, " ".join(f"{n} {out[n]['query_ttft_s'][-1]:.3f}s" for n in names), flush=True)
    return out


def long_doc_report(results: dict[str, Any], report: Report) -> None:
    """Rows: warm-up and query TTFT per configuration; kvtier's query rows against vLLM's prefix cache."""
    ceiling: Row | None = None
    if "vllm+prefix" in results:
        ceiling = report.add("query TTFT", results["vllm+prefix"]["query_ttft_s"], series="vllm+prefix")
    for name, res in results.items():
        report.add("warm-up TTFT", res["warmup_ttft_s"], series=name)
        if name != "vllm+prefix":
            vs = ceiling if name.startswith("kvtier") else None
            report.add("query TTFT", res["query_ttft_s"], series=name, vs=vs)
    if "kvtier" in results and "kvtier+layerwise" in results:
        whole, layered = results["kvtier"], results["kvtier+layerwise"]
        report.meta["layerwise_vs_whole"] = {
            "query_ttft": pair_ratios(layered["query_ttft_s"], whole["query_ttft_s"]),
            "warmup_ttft": pair_ratios(layered["warmup_ttft_s"], whole["warmup_ttft_s"])}


# ---- multi-round-qa ----------------------------------------------------------------------------------
def multi_round_qa(ports: dict[str, int], users: int, rounds: int, system_words: int, history_words: int,
                   answer_len: int) -> dict[str, Any]:
    """Per configuration and round: every user's TTFT (users concurrent, configurations in turn)."""
    names = list(ports)
    system = "System: you answer questions about lists. " + documents(1, system_words)[0]
    contexts = documents(users, history_words, first=1)
    history = {n: [f"{system}\nUser {u} shares: {contexts[u]}\n" for u in range(users)] for n in names}
    ttft: dict[str, list[list[float]]] = {n: [] for n in names}  # [round][user]
    same_prompts = True
    with ThreadPoolExecutor(users) as pool:
        for r in range(rounds):
            question = f"User: question {r}: which word comes after the {r + 1}th one?\nAssistant:"
            for name in rotated(names, r):
                prompts = [h + question for h in history[name]]
                results = list(pool.map(lambda p, port=ports[name]: stream(port, p, answer_len), prompts))
                ttft[name].append([s.ttft for s in results])
                history[name] = [p + s.text + "\n" for p, s in zip(prompts, results)]
            same_prompts = same_prompts and all(history[n] == history[names[0]] for n in names)
            print(f"  round {r}: " + " ".join(f"{n} {statistics.median(ttft[n][-1]):.3f}s" for n in names), flush=True)
    return {"ttft_s": ttft, "same_prompts": same_prompts}


def multi_round_report(results: dict[str, Any], report: Report) -> None:
    """Rows: round-1 TTFT and rounds 2+ TTFT per configuration (per user and round); kvtier's rounds 2+
    against vLLM's prefix cache."""
    ttft = results["ttft_s"]
    report.meta["same_prompts"] = results["same_prompts"]
    later = {name: [t for round_ in rounds[1:] for t in round_] for name, rounds in ttft.items()}
    ceiling: Row | None = None
    if "vllm+prefix" in ttft and later["vllm+prefix"]:
        ceiling = report.add("rounds 2+ TTFT", later["vllm+prefix"], series="vllm+prefix")
    for name, rounds in ttft.items():
        report.add("round 1 TTFT", rounds[0], series=name)
        if name != "vllm+prefix" and later[name]:
            vs = ceiling if name.startswith("kvtier") else None
            report.add("rounds 2+ TTFT", later[name], series=name, vs=vs)


# ---- async-itl ---------------------------------------------------------------------------------------
DECODERS = 3


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def itl_stats(gaps: list[float]) -> dict[str, float]:
    return {"p50": _percentile(gaps, 0.5), "p90": _percentile(gaps, 0.9), "max": max(gaps), "count": len(gaps)}


def decode_run(port: int, tokens: int, fourth: str | None, fourth_after: int = 8) -> tuple[list[Stream], Stream | None]:
    """Three users stream ``tokens`` each; with ``fourth``, once all three have ``fourth_after`` tokens a
    fourth request sends it (2 output tokens). Returns the three streams and the fourth's."""
    ready = threading.Event()  # set once every decoder has streamed ``fourth_after`` tokens
    lock = threading.Lock()
    reached = [0]

    def on_token(n: int) -> None:  # never blocks: a stalled reader would inflate the gaps measured
        if n == fourth_after:
            with lock:
                reached[0] += 1
                if reached[0] == DECODERS:
                    ready.set()

    def user(u: int) -> Stream:
        return stream(port, f"User {u}: count from 1 to 1000: 1, 2, 3,", tokens, on_token, ignore_eos=True)

    with ThreadPoolExecutor(DECODERS) as pool:
        futures = [pool.submit(user, u) for u in range(DECODERS)]
        if not ready.wait(600):
            raise RuntimeError("the decoding users did not start streaming within 600 s")
        load = stream(port, fourth, 2) if fourth is not None else None
        return [f.result() for f in futures], load


def overlapping(runs: list[Stream], window: tuple[float, float]) -> list[float]:
    """The inter-token gaps of ``runs`` that overlap ``window`` (a gap spanning all of it included)."""
    return [b - a for s in runs for a, b in s.gaps() if b > window[0] and a < window[1]]


_SPAN = re.compile(r"kvtier: load of \S+ \((sync|async)\) reached (\d+) of (\d+) tokens, "
                   r"monotonic ([\d.]+) to ([\d.]+)")


def load_spans(log_text: str) -> list[tuple[float, float]]:
    """Every load span the connector logged (:data:`~kvtier.integrations.vllm.transfer.LOAD_SPAN_LOG`)."""
    return [(float(m[4]), float(m[5])) for m in _SPAN.finditer(log_text)]


def loading_stats(runs: list[Stream], load: Stream, spans: list[tuple[float, float]]) -> dict[str, Any]:
    """ITL of ``runs`` during the load that began while ``load`` waited for its first token (the
    connector's span), and during the whole wait; the load's duration and the fourth's TTFT; the gaps
    in the span and when it began after the fourth's request (what the window held)."""
    mine = [sp for sp in spans if load.sent <= sp[0] <= load.stamps[0]]
    if len(mine) != 1:
        raise RuntimeError(f"expected one load of the fourth request in the server log, found {len(mine)}: "
                           "did its prompt hit kvtier?")
    during, until = overlapping(runs, mine[0]), overlapping(runs, (load.sent, load.stamps[0]))
    if not until:
        raise RuntimeError(f"no decoder token arrived while the fourth request waited {load.ttft:.2f}s: "
                           "raise --decode-tokens")
    return {"itl": itl_stats(during), "itl_until_first_token": itl_stats(until), "load_s": mine[0][1] - mine[0][0],
            "fourth_ttft_s": load.ttft, "fourth_prompt_tokens": load.usage["prompt_tokens"],
            "window_gaps_s": during, "span_after_sent_s": mine[0][0] - load.sent, "span": list(mine[0])}


def _loaded_run(port: int, tokens: int, prompt: str, log: Path) -> dict[str, Any]:
    """One run of three decoders and a fourth sending ``prompt``; its :func:`loading_stats`."""
    runs, load = decode_run(port, tokens, prompt)
    assert load is not None
    time.sleep(0.5)  # the span's log line reaches the file
    return loading_stats(runs, load, load_spans(log.read_text(errors="replace")))


def async_itl(ports: dict[str, int], logs: dict[str, Path], repeats: int, doc_words: int,
              tokens: int) -> dict[str, Any]:
    """Per configuration and repeat: ITL of three users alone, during a fourth's disk-tier load and
    during a fourth's CPU-tier load (the same arrival whose KV needs no lower-tier read), whose spans
    the configuration's server log ``logs[name]`` tells. The two loaded runs alternate which goes first."""
    names = list(ports)
    # the fourth sends a prompt stored whole before (its partial last chunk too): all but its last token
    # are loaded, so its own prefill is one token, as a decoding user's step; the last disk document only
    # pushes the others out of the CPU tier; a CPU document is stored just before its run (the CPU tier
    # holds one document, so it evicts the disk one a run before promoted)
    suffix = "\nQuestion: which word comes first?\nAnswer:"
    disk = [doc + suffix for doc in documents(repeats + 1, doc_words, first=100)]
    cpu = [doc + suffix for doc in documents(repeats, doc_words, first=100 + repeats + 1)]
    for name in names:  # store every prompt (CPU + disk); each evicts the one before from the CPU tier
        for prompt in disk:
            stream(ports[name], prompt, 1)
    time.sleep(2)  # the write-back to disk finishes
    out: dict[str, Any] = {n: {"alone": [], "loading": [], "cpu_loading": []} for n in names}
    for k in range(repeats):
        for name in rotated(names, k):
            runs, _ = decode_run(ports[name], tokens, None)
            out[name]["alone"].append({"itl": itl_stats([b - a for s in runs for a, b in s.gaps(8)])})
            for kind in (("loading", "cpu_loading") if k % 2 else ("cpu_loading", "loading")):
                if kind == "cpu_loading":
                    stream(ports[name], cpu[k], 1)  # now the CPU tier's one document
                    time.sleep(2)  # its write-back to disk finishes before the run
                out[name][kind].append(_loaded_run(ports[name], tokens, (cpu if kind == "cpu_loading" else disk)[k],
                                                   logs[name]))
            alone, d, c = out[name]["alone"][-1], out[name]["loading"][-1], out[name]["cpu_loading"][-1]
            print(f"  {name} repeat {k}: ITL p50 {alone['itl']['p50'] * 1e3:.0f} ms alone, "
                  f"{d['itl']['p50'] * 1e3:.0f} ms during the {d['load_s']:.2f}s disk load, "
                  f"{c['itl']['p50'] * 1e3:.0f} ms during the {c['load_s']:.2f}s CPU-tier load; fourth TTFT "
                  f"{d['fourth_ttft_s']:.2f}s / {c['fourth_ttft_s']:.2f}s ({d['fourth_prompt_tokens']} tokens)",
                  flush=True)
    return out


def async_itl_report(results: dict[str, Any], report: Report) -> None:
    """Rows per configuration: the decoders' ITL p50 / p90 / max alone and during the fourth's disk
    load (against alone, repeat by repeat); ITL p50 during a CPU-tier load (against alone), and the
    disk load's against it (what the lower-tier read adds to the same arrival and window); ITL p50 until
    the fourth's first token for both; the loads' durations and the fourth's TTFT."""
    for name, res in results.items():
        alone = {stat: report.add(f"ITL {stat} alone", [r["itl"][stat] for r in res["alone"]], series=name)
                 for stat in ("p50", "p90", "max")}
        for stat, row in alone.items():
            report.add(f"ITL {stat} during load", [r["itl"][stat] for r in res["loading"]], series=name, vs=row)
        cpu = report.add("ITL p50 during CPU-tier load", [r["itl"]["p50"] for r in res["cpu_loading"]],
                         series=name, vs=alone["p50"])
        report.add("ITL p50 during load vs CPU-tier load", [r["itl"]["p50"] for r in res["loading"]],
                   series=name, vs=cpu)
        until = {kind: report.add(f"ITL p50 until 4th's first token{label}",
                                  [r["itl_until_first_token"]["p50"] for r in res[kind]], series=name, vs=alone["p50"])
                 for kind, label in (("cpu_loading", " (CPU tier)"), ("loading", ""))}
        report.add("ITL p50 until 4th's first token vs CPU tier",
                   [r["itl_until_first_token"]["p50"] for r in res["loading"]], series=name, vs=until["cpu_loading"])
        for kind, label in (("loading", ""), ("cpu_loading", " (CPU tier)")):
            report.add(f"load{label}", [r["load_s"] for r in res[kind]], series=name)
            report.add(f"4th user TTFT{label}", [r["fourth_ttft_s"] for r in res[kind]], series=name)


# ---- running -----------------------------------------------------------------------------------------
def ttft_configs(names: list[str], chunk_tokens: int, cpu_capacity: str) -> list[Config]:
    overrides = {"cpu": {"capacity": cpu_capacity}, "chunk_tokens": chunk_tokens}
    known = {
        "vllm": Config("vllm", kvtier=False),
        "vllm+prefix": Config("vllm+prefix", kvtier=False, prefix_caching=True),
        "kvtier": Config("kvtier", kvtier=True, overrides=overrides),
        "kvtier+layerwise": Config("kvtier+layerwise", kvtier=True, overrides=overrides, layerwise=True),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise typer.BadParameter(f"unknown configurations {unknown}; choose from {list(known)}")
    return [known[n] for n in names]


def itl_configs(workdir: Path, chunk_tokens: int, doc_words: int, load_nices: Sequence[int] = ()) -> list[Config]:
    """kvtier with a disk tier and a CPU tier that holds one document (and the decoders' prompts):
    synchronous loads, asynchronous loads, and asynchronous loads at each of ``load_nices``."""
    doc_mib = 2 * doc_words * 46080 / (1 << 20)  # SmolLM2-135M, float32: 46,080 bytes per token
    configs = []
    variants: list[tuple[str, bool, int | None]] = [("kvtier-sync", False, None), ("kvtier-async", True, None)]
    variants += [(f"kvtier-async-nice{n}", True, n) for n in load_nices]
    for name, load_async, nice in variants:
        overrides = {"chunk_tokens": chunk_tokens, "cpu": {"capacity": f"{int(doc_mib * 1.4)}MiB"},
                     "disk": {"enabled": True, "path": str(workdir / f"disk-{name}"), "capacity": "4GiB"}}
        configs.append(Config(name, kvtier=True, overrides=overrides, load_async=load_async, load_nice=nice))
    return configs


QUICK = {"docs": 2, "doc_words": 300, "users": 2, "rounds": 2, "answer_len": 8, "repeats": 1, "decode_tokens": 32}
GOALS = {"long-doc-qa": 1 / 1.1, "multi-round-qa": 1 / 1.1, "async-itl": 1 / 1.2}
TITLES = {"long-doc-qa": "long-doc-qa TTFT, interleaved (vs vLLM's own prefix-cache hit)",
          "multi-round-qa": "multi-round-qa TTFT, interleaved (vs vLLM's own prefix-cache hit)",
          "async-itl": "ITL of 3 decoding users during a 4th's 4K-token disk-tier load (vs alone)"}


def run(scenario: str, configs: str, *, model: str | None = None, docs: int = 3, doc_words: int | None = None,
        output_len: int = 8, users: int = 4, rounds: int = 3, system_words: int = 150, history_words: int = 350,
        answer_len: int = 32, repeats: int = 3, decode_tokens: int = 128, chunk_tokens: int = 128,
        cpu_capacity: str = "1GiB", layerwise: bool = False, load_nices: Sequence[int] = (), kv_space_gib: int = 1,
        start_timeout: float = 600, out_dir: str = "results", show: bool = True) -> dict[str, Any]:
    """Run one scenario; write ``<out_dir>/vllm_<scenario>.json`` and ``.png``; return the record.
    ``doc_words`` defaults to 1,000 (≈2K tokens) for long-doc-qa, 2,040 (≈4K tokens) for async-itl."""
    require_engine("vllm", "vllm")
    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"--scenario must be one of {SCENARIOS}, got {scenario!r}")
    if doc_words is None:
        doc_words = 2040 if scenario == "async-itl" else 1000
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    load_before = os.getloadavg()
    params = {"docs": docs, "doc_words": doc_words, "output_len": output_len, "users": users, "rounds": rounds,
              "repeats": repeats, "decode_tokens": decode_tokens, "chunk_tokens": chunk_tokens,
              "cpu_capacity": cpu_capacity, "kv_space_gib": kv_space_gib}
    with tempfile.TemporaryDirectory(prefix="kvtier-vllm-bench-") as tmp:
        workdir = Path(tmp)
        if scenario == "async-itl":
            chosen = itl_configs(workdir, chunk_tokens, doc_words, load_nices)
            max_model_len = 2 * doc_words + 512
        else:
            names = [n for n in configs.split(",") if n]
            if layerwise and "kvtier+layerwise" not in names:
                names.append("kvtier+layerwise")
            chosen = ttft_configs(names, chunk_tokens, cpu_capacity)
            max_model_len = 4096
        report = Report(f"vllm_{scenario.replace('-', '_')}", TITLES[scenario], unit="s", goal=GOALS[scenario],
                        meta={"scenario": scenario, "configs": [c.name for c in chosen], "params": params})
        with servers(chosen, workdir, model, max_model_len, kv_space_gib, start_timeout) as ports:
            if scenario == "long-doc-qa":
                results = long_doc_qa(ports, docs, doc_words, output_len)
                long_doc_report(results, report)
            elif scenario == "multi-round-qa":
                results = multi_round_qa(ports, users, rounds, system_words, history_words, answer_len)
                multi_round_report(results, report)
            else:
                results = async_itl(ports, {c.name: workdir / f"{c.name}.log" for c in chosen}, repeats,
                                    doc_words, decode_tokens)
                async_itl_report(results, report)
            report.meta["cache"] = {name: hit_rates(port) for name, port in ports.items()}
    report.meta["results"] = results
    report.meta["load_average"] = {"before": load_before, "after": os.getloadavg(),
                                   "note": "the machine may be shared: compare rows of this run only"}
    return report.finish(out_dir, show=show)


def parse_nices(text: str) -> list[int]:
    """``--load-nice``'s comma list as nice values (0-19); a bad one is named."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"--load-nice must be comma-separated integers, got {text!r}") from None
    return [check_nice(v) for v in values]


def register(app: typer.Typer) -> None:
    @app.command("vllm")
    def vllm_cmd(
        scenario: str = typer.Option("long-doc-qa", help="long-doc-qa, multi-round-qa or async-itl."),
        configs: str = typer.Option("vllm,vllm+prefix,kvtier",
                                    help="TTFT scenarios: comma list of vllm, vllm+prefix, kvtier, kvtier+layerwise."),
        model: str = typer.Option(None, help="HF model directory (default: the embedded SmolLM2)."),
        docs: int = typer.Option(3, help="long-doc-qa: documents."),
        doc_words: int = typer.Option(None, help="Words per document, ≈2 tokens each (default: 1000 for "
                                                 "long-doc-qa, 2040 for async-itl)."),
        output_len: int = typer.Option(8, help="long-doc-qa: tokens generated per request."),
        users: int = typer.Option(4, help="multi-round-qa: users chatting at once."),
        rounds: int = typer.Option(3, help="multi-round-qa: rounds per user."),
        answer_len: int = typer.Option(32, help="multi-round-qa: tokens per answer."),
        repeats: int = typer.Option(3, help="async-itl: loads measured per configuration."),
        decode_tokens: int = typer.Option(128, help="async-itl: tokens each decoding user streams."),
        chunk_tokens: int = typer.Option(128, help="kvtier chunk (128 = vLLM's CPU block)."),
        cpu_capacity: str = typer.Option("1GiB", help="TTFT scenarios: kvtier CPU tier size."),
        layerwise: bool = typer.Option(False, help="TTFT scenarios: add kvtier+layerwise."),
        load_nice: str = typer.Option("", help="async-itl: also run the asynchronous loader at these nice values "
                                               "(comma list, 0-19; default loader: 10)."),
        quick: bool = typer.Option(False, help="A smoke run: tiny documents, few users, rounds and repeats."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """vLLM with and without kvtier, configurations interleaved: hit TTFT or inter-token latency."""
        sizes: dict[str, Any] = {"docs": docs, "doc_words": doc_words, "users": users, "rounds": rounds,
                                 "answer_len": answer_len, "repeats": repeats, "decode_tokens": decode_tokens}
        if quick:
            sizes.update(QUICK)
        run(scenario, configs, model=model, output_len=output_len, chunk_tokens=chunk_tokens,
            cpu_capacity=cpu_capacity, layerwise=layerwise, load_nices=parse_nices(load_nice), out_dir=out, **sizes)
