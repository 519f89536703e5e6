"""Router benchmarks on real vLLM servers (run in the vLLM venv), and the process helpers they share
with the real-vLLM router tests.

``multi-round-qa``: two vLLM instances, each with kvtier's own CPU tier (no shared lower tier, vLLM's
prefix cache off) and joined to a ``kvtier controller``; ``kvtier router`` in front. Users each have a
long context; every round a user asks one more question after it, so round ``r`` reuses the prefix of
round ``r - 1``. Policies ``kv`` and ``roundrobin`` are run on fresh contexts each (so no policy profits
from another's cache), plus a single-instance reference (one backend). Hit rate = kvtier-served prompt
tokens ÷ prompt tokens, from the instances' own ``/metrics`` (``vllm:external_prefix_cache_hits`` and
``vllm:prompt_tokens``), deltas over the run. The ratio printed is kv hit rate ÷ single-instance hit rate.

``disagg``: a ``kvtier server`` shared tier, a prefiller (``kv_producer``) and a decoder
(``kv_consumer``) behind ``kvtier router --prefill --decode``, against one kv_both instance alone:
TTFT and inter-token latency of streamed completions of distinct prompts.

    .venv-vllm/bin/kvtier bench router --part all
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from kvtier.procs import Child, free_port, wait_healthy

SERVED = "smol"
TOKEN = "router-bench-token"


class Service:
    """A started process (kvtier subcommand or vLLM server) with its log file; ``url`` once known.

    kvtier subcommands print their address on stdout (read by :class:`kvtier.procs.Child`'s reader
    thread) and log on stderr; vLLM servers write everything to the log."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], url: str = "") -> None:
        self.log_path = log
        self.url = url
        self.child = Child(argv, log=log, env=env, channel=None if url else "stdout")
        self.proc = self.child.proc

    def read_url(self, timeout_s: float = 120.0) -> str:
        """For kvtier subcommands: the ``HOST:PORT`` their ready line names."""
        port = self.child.expect(r"(?:http://)?[\d.]+:(\d+)", timeout_s).group(1)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        try:
            wait_healthy(self.url, self.proc, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{self.child.log_tail()}") from exc

    def stop(self) -> None:
        self.child.stop(30)


def kvtier_service(args: list[str], log: Path, env: dict[str, str] | None = None) -> Service:
    """``python -m kvtier.cli ARGS`` of this interpreter, once it printed its address."""
    svc = Service([sys.executable, "-m", "kvtier.cli", *args], log, {**os.environ, **(env or {})})
    try:
        svc.read_url()
    except BaseException:
        svc.stop()
        raise
    return svc


def vllm_service(model_dir: Path, log: Path, overrides: dict[str, Any], kv_role: str = "kv_both") -> Service:
    """``kvtier serve``'s vLLM server on a free port (not waited for: call :meth:`Service.wait_healthy`)."""
    from kvtier.integrations.vllm.cli import server_command, server_env

    port = free_port()
    argv = server_command(str(model_dir), port=port, overrides=overrides, served_model_name=SERVED, kv_role=kv_role,
                          extra_args=["--enforce-eager", "--seed", "0"])
    env = server_env({k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"})
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return Service(argv, log, env, url=f"http://127.0.0.1:{port}")


def cluster_overrides(controller_url: str, instance_id: str, chunk_tokens: int = 256) -> dict[str, Any]:
    """kvtier overrides of an instance with its own CPU tier, joined to the controller."""
    return {"chunk_tokens": chunk_tokens, "cpu": {"capacity": "256MiB"},
            "cluster": {"enabled": True, "controller_url": controller_url, "instance_id": instance_id,
                        "token": TOKEN, "p2p": False}}


def vllm_metric(url: str, name: str) -> float:
    """Sum over the samples of counter ``name`` (e.g. ``vllm:prompt_tokens``) in a server's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((f"{name}_total", f"{name}{{", f"{name} ")) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _histogram_sum(url: str, name: str, label: str) -> float:
    """``<name>_sum`` over the samples carrying ``label`` in a kvtier /metrics page."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"{name}_sum") and label in line)


def stream_completion(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
                      ) -> tuple[str, float, list[float], dict[str, str]]:
    """(text, TTFT s, inter-token gaps s, response headers) of one streamed completion."""
    import httpx

    start = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {resp.read()!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            text = json.loads(line[6:])["choices"][0].get("text", "")
            if text:
                stamps.append(time.perf_counter())
                parts.append(text)
        resp_headers = dict(resp.headers)
    if not stamps:
        raise RuntimeError(f"{url}: empty stream")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return "".join(parts), stamps[0] - start, gaps, resp_headers


def _doc(seed: int, words: int) -> str:
    names = ["amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "heron", "indigo", "juniper"]
    return " ".join(f"{names[(seed * 7 + i * 3) % len(names)]}{(seed * 37 + i) % 61}" for i in range(words))


@contextmanager
def _services() -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in reversed(started):
            svc.stop()


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "n": len(values)}


def multi_round(model_dir: Path, work: Path, users: int, rounds: int, words: int, max_tokens: int) -> dict[str, Any]:
    with _services() as svcs:
        ctl = kvtier_service(["controller", "--port", "0", "--log-level", "warning"], work / "controller.log",
                             {"KVTIER_CONTROLLER_TOKEN": TOKEN})
        svcs.append(ctl)
        engines = {f"i{n}": vllm_service(model_dir, work / f"vllm-i{n}.log", cluster_overrides(ctl.url, f"i{n}"))
                   for n in range(2)}
        svcs.extend(engines.values())
        for svc in engines.values():
            svc.wait_healthy()
        backends = [a for name, svc in engines.items() for a in ("--backend", f"{svc.url}={name}")]
        common = ["--port", "0", "--controller", ctl.url, "--tokenizer", str(model_dir), "--backend-header"]
        routers = {
            "kv": kvtier_service(["router", *common, *backends, "--policy", "kv"], work / "router-kv.log",
                                 {"KVTIER_CONTROLLER_TOKEN": TOKEN}),
            "roundrobin": kvtier_service(["router", *common, *backends, "--policy", "roundrobin"],
                                         work / "router-rr.log"),
            "single": kvtier_service(["router", *common, "--backend", f"{engines['i0'].url}=i0"],
                                     work / "router-single.log"),
        }
        svcs.extend(routers.values())
        out: dict[str, Any] = {}
        for seed_base, (policy, router) in enumerate(routers.items()):
            before = {n: (vllm_metric(s.url, "vllm:prompt_tokens"),
                          vllm_metric(s.url, "vllm:external_prefix_cache_hits")) for n, s in engines.items()}
            contexts = [_doc(100 * (seed_base + 1) + u, words) for u in range(users)]
            ttfts: list[float] = []
            per_round: list[list[float]] = [[] for _ in range(rounds)]
            where: dict[str, int] = {}
            for r in range(rounds):
                for u, ctx in enumerate(contexts):
                    questions = " ".join(f"\nQ{q}: what is word {q * 7 + u}?" for q in range(r + 1))
                    body = {"model": SERVED, "prompt": ctx + questions, "max_tokens": max_tokens, "temperature": 0}
                    _text, ttft, _gaps, headers = stream_completion(router.url, body)
                    ttfts.append(ttft)
                    per_round[r].append(ttft)
                    backend = headers.get("x-kvtier-backend", "")
                    where[backend] = where.get(backend, 0) + 1
            prompt = hits = 0.0
            for n, s in engines.items():
                prompt += vllm_metric(s.url, "vllm:prompt_tokens") - before[n][0]
                hits += vllm_metric(s.url, "vllm:external_prefix_cache_hits") - before[n][1]
            res: dict[str, Any] = {
                "hit_rate": hits / prompt if prompt else 0.0, "prompt_tokens": prompt, "hit_tokens": hits,
                "ttft_s": _summary(ttfts), "ttft_by_round_median_s": [statistics.median(x) for x in per_round],
                "requests_per_backend": where}
            out[policy] = res
            print(f"{policy:>10}: hit rate {res['hit_rate']:.3f}, TTFT mean {res['ttft_s']['mean']:.3f}s "
                  f"median {res['ttft_s']['median']:.3f}s, backends {where}", flush=True)
        single = out["single"]["hit_rate"]
        out["ratio_kv_vs_single_hit_rate"] = out["kv"]["hit_rate"] / single if single else 0.0
        out["ratio_roundrobin_vs_single_hit_rate"] = out["roundrobin"]["hit_rate"] / single if single else 0.0
        out["setup"] = {"users": users, "rounds": rounds, "context_words": words, "max_tokens": max_tokens,
                        "instances": 2, "chunk_tokens": 256, "vllm_prefix_caching": False}
        return out


def disagg(model_dir: Path, work: Path, prompts: int, words: int, max_tokens: int) -> dict[str, Any]:
    with _services() as svcs:
        server = kvtier_service(["server", "--port", "0", "--capacity", "1GiB", "--log-level", "warning"],
                                work / "server.log")
        svcs.append(server)
        port = int(server.url.rsplit(":", 1)[1])
        shared = {"chunk_tokens": 256, "cpu": {"capacity": "256MiB"},
                  "remote": {"enabled": True, "port": port, "timeout_s": 10.0}}
        engines = {"prefill": vllm_service(model_dir, work / "vllm-prefill.log", shared, "kv_producer"),
                   "decode": vllm_service(model_dir, work / "vllm-decode.log", shared, "kv_consumer"),
                   "single": vllm_service(model_dir, work / "vllm-single.log", {"chunk_tokens": 256})}
        svcs.extend(engines.values())
        for svc in engines.values():
            svc.wait_healthy()
        router = kvtier_service(["router", "--port", "0", "--prefill", engines["prefill"].url, "--decode",
                                 engines["decode"].url, "--policy", "least_loaded"], work / "router-disagg.log")
        svcs.append(router)
        urls = {"single": engines["single"].url, "1p1d": router.url}
        ttfts: dict[str, list[float]] = {m: [] for m in urls}
        gaps: dict[str, list[float]] = {m: [] for m in urls}
        texts: dict[str, list[str]] = {m: [] for m in urls}
        hits_before = vllm_metric(engines["decode"].url, "vllm:external_prefix_cache_hits")
        prefill_before = _histogram_sum(router.url, "kvtier_router_upstream_seconds", 'role="prefill"')
        for i in range(prompts):  # modes interleaved, so a change in machine load hits both alike
            body = {"model": SERVED, "prompt": _doc(900 + i, words) + "\nList the next words:",
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            for mode, url in urls.items():
                text, ttft, itl, _headers = stream_completion(url, body)
                texts[mode].append(text)
                ttfts[mode].append(ttft)
                gaps[mode].extend(itl)
        out: dict[str, Any] = {m: {"ttft_s": _summary(ttfts[m]), "itl_s": _summary(gaps[m])} for m in urls}
        out["1p1d"]["prefill_mean_s"] = (_histogram_sum(router.url, "kvtier_router_upstream_seconds",
                                                        'role="prefill"') - prefill_before) / prompts
        for mode in urls:
            print(f"{mode:>7}: TTFT median {out[mode]['ttft_s']['median']:.3f}s, ITL median "
                  f"{out[mode]['itl_s']['median'] * 1e3:.1f}ms", flush=True)
        out["identical_outputs"] = texts["single"] == texts["1p1d"]
        out["decoder_external_hit_tokens"] = vllm_metric(engines["decode"].url,
                                                         "vllm:external_prefix_cache_hits") - hits_before
        out["decoder_prompt_tokens"] = vllm_metric(engines["decode"].url, "vllm:prompt_tokens")
        out["ratio_ttft_single_vs_1p1d_median"] = out["single"]["ttft_s"]["median"] / out["1p1d"]["ttft_s"]["median"]
        out["setup"] = {"prompts": prompts, "context_words": words, "max_tokens": max_tokens,
                        "shared_tier": "kvtier server", "roles": ["kv_producer", "kv_consumer"]}
        return out


def run(part: str = "all", users: int = 3, rounds: int = 3, words: int = 220, prompts: int = 4,
        work_dir: str = "", out_dir: str = "results") -> dict[str, Any]:
    """Run ``part`` (router, disagg or all); write ``router.json|png`` / ``disagg.json|png``."""
    import tempfile

    from kvtier.bench.common import bar_plot, require_engine, write_results
    from kvtier.models import ensure_embedded_model

    require_engine("vllm", "router")
    model_dir = ensure_embedded_model()
    work = Path(work_dir or tempfile.mkdtemp(prefix="router-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if part in ("router", "all"):
        res = results["router"] = multi_round(model_dir, work, users, rounds, words, max_tokens=8)
        write_results("router", res, out_dir)
        names = ["single", "kv", "roundrobin"]
        bar_plot(f"{out_dir}/router.png", "multi-round-qa, 2 vLLM instances: hit rate and TTFT",
                 ["hit rate", "mean TTFT (s)", "median TTFT (s)"],
                 {n: [res[n]["hit_rate"], res[n]["ttft_s"]["mean"], res[n]["ttft_s"]["median"]] for n in names},
                 "hit rate / seconds")
        print(f"kv hit rate / single-instance hit rate = {res['ratio_kv_vs_single_hit_rate']:.3f}; "
              f"roundrobin: {res['ratio_roundrobin_vs_single_hit_rate']:.3f}", flush=True)
    if part in ("disagg", "all"):
        res = results["disagg"] = disagg(model_dir, work, prompts, words, max_tokens=32)
        write_results("disagg", res, out_dir)
        bar_plot(f"{out_dir}/disagg.png", "1 prefill + 1 decode vs single instance (streamed)",
                 ["TTFT median (s)", "ITL median (s x10)"],
                 {m: [res[m]["ttft_s"]["median"], res[m]["itl_s"]["median"] * 10] for m in ("single", "1p1d")},
                 "seconds")
        print(f"single TTFT / 1p1d TTFT (median) = {res['ratio_ttft_single_vs_1p1d_median']:.3f}; identical "
              f"outputs: {res['identical_outputs']}; decoder external hits {res['decoder_external_hit_tokens']:.0f}",
              flush=True)
    return results


def register(app: typer.Typer) -> None:
    @app.command("router")
    def router_cmd(
        part: str = typer.Option("all", help="router (multi-round-qa), disagg (1p1d) or all."),
        users: int = typer.Option(3, min=1, help="Users; odd, so round-robin moves users."),
        rounds: int = typer.Option(3, min=2, help="Rounds per user."),
        words: int = typer.Option(220, help="Context words per user (~3 tokens each)."),
        prompts: int = typer.Option(4, min=1, help="Distinct prompts of the disagg part."),
        quick: bool = typer.Option(False, "--quick", help="1 user, 2 rounds, 1 prompt: proves it works."),
        work: str = typer.Option("", help="Folder for logs (default: a temporary one)."),
        out: str = typer.Option("results", help="Output directory."),
    ) -> None:
        """KV-aware vs round-robin routing over 2 real vLLM instances; 1p1d disaggregated prefill.
        Runs in vLLM's environment (e.g. .venv-vllm/bin/kvtier bench router)."""
        if part not in ("router", "disagg", "all"):
            raise typer.BadParameter(f"--part {part!r}: expected router, disagg or all")
        if quick:
            users, rounds, prompts = 1, 2, 1
        run(part, users, rounds, words, prompts, work, out)
