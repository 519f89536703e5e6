"""kvtier inside a real vLLM engine (vllm-cpu, SmolLM2-135M, float32, in-process).

Greedy output must be identical with a kvtier miss, a kvtier hit, a failed kvtier load and vLLM without
kvtier; hits must show up in vLLM's own accounting (``num_cached_tokens``, the
``vllm:external_prefix_cache_hits`` counter). Skipped when vllm is not importable (the main venv); run
in the venv built by ``scripts/install-vllm.sh``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

CHUNK = 256
MAX_TOKENS = 8
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


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


PREEMPT_LEN = 126  # just under one 128-token block: every request needs a second block while decoding
PREEMPT_TOKENS = 16
PREEMPT_CHUNK = 64


@pytest.fixture(scope="module")
def reference(vllm_env: dict[str, str], model_dir: Path) -> list[str]:
    """vLLM alone (no connector, no prefix caching)."""
    llm = _make_llm(model_dir, None, enable_prefix_caching=False)
    try:
        return [text for text, _n, _c in _generate(llm, [*PROMPTS, NOVEL])]
    finally:
        _close(llm)


@pytest.fixture(scope="module")
def preempt_prompts(model_dir: Path) -> list[dict[str, list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [{"prompt_token_ids": tok.encode(_doc(10 + i, 200))[:PREEMPT_LEN]} for i in range(4)]


@pytest.fixture(scope="module")
def preempt_reference(vllm_env: dict[str, str], model_dir: Path, preempt_prompts: list[Any],
                      reference: list[str]) -> list[str]:
    llm = _make_llm(model_dir, None, enable_prefix_caching=False, max_model_len=256)
    try:
        return [t for t, _n, _c in _generate(llm, preempt_prompts, PREEMPT_TOKENS)]
    finally:
        _close(llm)


@pytest.fixture(scope="module")
def kvtier_runs(vllm_env: dict[str, str], model_dir: Path, reference: list[str]) -> dict[str, Any]:
    """One kvtier LLM (prefix caching off, chunked prefill of 256 tokens): miss, hit, two kinds of failed
    load. Returns what each round produced."""
    from kvtier.integrations.vllm import reset_engines

    reset_engines()
    llm = _make_llm(model_dir, _kvtier_extra(), enable_prefix_caching=False, max_num_batched_tokens=256)
    runs: dict[str, Any] = {}
    try:
        connector = _connector()
        engine = connector.engine
        runs["miss"] = _generate(llm, PROMPTS)
        runs["stored_chunks"] = len(engine.cpu)
        runs["hit"] = _generate(llm, PROMPTS)
        runs["external_hits"] = _metric(llm, "vllm:external_prefix_cache_hits")
        runs["novel"] = _generate(llm, [NOVEL])[0]
        real_retrieve = engine.retrieve

        def short_retrieve(tokens: Any, into: Any) -> int:
            """Deliver only the first chunk, poison the rest of the staging buffer."""
            hit = real_retrieve(tokens, into)
            into[:, :, CHUNK:].fill_(float("nan"))
            return min(hit, CHUNK)

        def broken_retrieve(tokens: Any, into: Any) -> int:
            raise OSError("disk on fire")

        engine.retrieve = short_retrieve
        before = dict(connector.counters)
        runs["short"] = _generate(llm, PROMPTS)
        engine.retrieve = broken_retrieve
        runs["broken"] = _generate(llm, PROMPTS)
        engine.retrieve = real_retrieve
        runs["failures"] = connector.counters.get("load_failures", 0) - before.get("load_failures", 0)
        runs["after_failures"] = _generate(llm, PROMPTS)
        runs["counters"] = dict(connector.counters)
    finally:
        _close(llm)
    return runs


def test_kvtier_miss_matches_vllm(reference: list[str], kvtier_runs: dict[str, Any]) -> None:
    assert [t for t, _n, _c in kvtier_runs["miss"]] == reference[: len(PROMPTS)]
    # vLLM's prefix cache is off: nothing cached, except whole chunks PROMPTS[4] shares with PROMPTS[0]
    assert all(c == 0 for _t, _n, c in kvtier_runs["miss"][:4])
    assert kvtier_runs["miss"][4][2] % CHUNK == 0
    assert kvtier_runs["stored_chunks"] > 0


def test_kvtier_hit_matches_vllm_and_is_reported(reference: list[str], kvtier_runs: dict[str, Any]) -> None:
    hit = kvtier_runs["hit"]
    assert [t for t, _n, _c in hit] == reference[: len(PROMPTS)]
    # every prompt was stored whole (partial last chunk included): all but the last token come from kvtier
    for _text, n, cached in hit:
        assert cached == n - 1
    assert kvtier_runs["external_hits"] >= sum(n - 1 for _t, n, _c in hit)


def test_short_prompt_and_shared_prefix(reference: list[str], kvtier_runs: dict[str, Any]) -> None:
    _t, n_short, cached_short = kvtier_runs["hit"][3]
    assert n_short < CHUNK and cached_short == n_short - 1
    text, n, cached = kvtier_runs["novel"]
    assert text == reference[-1]
    assert 0 < cached < n - 1 and cached % CHUNK == 0  # only the whole chunks shared with PROMPTS[0]


def test_failed_load_recomputes(reference: list[str], kvtier_runs: dict[str, Any]) -> None:
    expected = reference[: len(PROMPTS)]
    assert [t for t, _n, _c in kvtier_runs["short"]] == expected
    assert [t for t, _n, _c in kvtier_runs["broken"]] == expected
    assert kvtier_runs["failures"] >= 2 * len(PROMPTS) - 2
    assert [t for t, _n, _c in kvtier_runs["after_failures"]] == expected


def test_prefix_cache_on_second_instance(
    vllm_env: dict[str, str], model_dir: Path, reference: list[str], kvtier_runs: dict[str, Any]
) -> None:
    """A second LLM in the same process shares the CacheEngine (hits at once); vLLM's own prefix cache
    on; a small block pool so requests get preempted and are looked up again when resumed."""
    llm = _make_llm(model_dir, _kvtier_extra(), enable_prefix_caching=True, max_model_len=1024,
                    num_gpu_blocks_override=12, max_num_seqs=4)
    try:
        first = _generate(llm, PROMPTS)
        second = _generate(llm, PROMPTS)
        preemptions = _metric(llm, "vllm:num_preemptions")
        external = _metric(llm, "vllm:external_prefix_cache_hits")
    finally:
        _close(llm)
    assert [t for t, _n, _c in first] == reference[: len(PROMPTS)]
    assert [t for t, _n, _c in second] == reference[: len(PROMPTS)]
    assert all(c == n - 1 for _t, n, c in first)  # kvtier hits from the first instance
    assert external > 0
    print(f"preemptions={preemptions} external_hits={external}")


def test_preemption_resumes_from_kvtier(
    vllm_env: dict[str, str], model_dir: Path, preempt_prompts: list[Any], preempt_reference: list[str]
) -> None:
    """Four requests in a pool of four usable blocks: each needs a second block while decoding, so vLLM
    preempts; resumed requests are looked up again (prompt + generated tokens) and output is unchanged."""
    extra = {"kvtier": {"chunk_tokens": PREEMPT_CHUNK, "cpu": {"capacity": "64MiB"}}}
    llm = _make_llm(model_dir, extra, enable_prefix_caching=False, max_model_len=256,
                    num_gpu_blocks_override=5, max_num_seqs=4)
    try:
        first = _generate(llm, preempt_prompts, PREEMPT_TOKENS)
        preemptions = _metric(llm, "vllm:num_preemptions")
        second = _generate(llm, preempt_prompts, PREEMPT_TOKENS)
    finally:
        _close(llm)
    assert [t for t, _n, _c in first] == preempt_reference
    assert [t for t, _n, _c in second] == preempt_reference
    assert preemptions > 0
    assert all(c == n - 1 for _t, n, c in second)


RESTART_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from kvtier.integrations.vllm import kv_transfer_config, reset_engines
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype="float32", max_model_len=2048, enforce_eager=True,
              distributed_executor_backend="uni", enable_prefix_caching=False, seed=0,
              kv_transfer_config=KVTransferConfig(**kv_transfer_config(args["extra"])))
    outs = llm.generate(args["prompts"], SamplingParams(temperature=0.0, max_tokens=args["max_tokens"]),
                        use_tqdm=False)
    result = [[o.outputs[0].text, len(o.prompt_token_ids), int(o.num_cached_tokens or 0)] for o in outs]
    reset_engines()  # flush the disk tier before exiting
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def _run_process(args: dict[str, Any], env: dict[str, str]) -> list[list[Any]]:
    proc = subprocess.run([sys.executable, "-c", RESTART_SCRIPT, json.dumps(args)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result: list[list[Any]] = json.loads(lines[-1][len("RESULT "):])
    return result


def test_restart_serves_from_disk(
    vllm_env: dict[str, str], model_dir: Path, reference: list[str], tmp_path: Path
) -> None:
    """Process 1 fills the disk tier and exits; process 2 (empty CPU tier) serves the prompts from disk."""
    extra = _kvtier_extra(disk={"enabled": True, "path": str(tmp_path / "disk"), "capacity": "1GiB",
                                "fsync": False})
    args = {"model": str(model_dir), "extra": extra, "prompts": PROMPTS[:3], "max_tokens": MAX_TOKENS}
    first = _run_process(args, vllm_env)
    assert any((tmp_path / "disk").rglob("*.kvt"))
    second = _run_process(args, vllm_env)
    assert [r[0] for r in first] == reference[:3]
    assert [r[0] for r in second] == reference[:3]
    assert all(r[2] == 0 for r in first)
    assert all(r[2] == r[1] - 1 for r in second)


def _post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


def test_openai_server_reports_kvtier_hits(
    vllm_env: dict[str, str], model_dir: Path, reference: list[str], tmp_path: Path
) -> None:
    """``kvtier serve``'s command: a real OpenAI-compatible server; the second identical request is
    served from kvtier, as vLLM's own /metrics counter of external prefix-cache hits shows."""
    import socket
    import time
    import urllib.request

    from kvtier.integrations.vllm_cli import server_command, server_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    argv = server_command(str(model_dir), port=port, overrides=_kvtier_extra()["kvtier"], served_model_name="smol",
                          extra_args=["--enforce-eager", "--seed", "0"])
    env = server_env({k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"})
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(1)
            body = {"model": "smol", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
            first = _post(port, "/v1/completions", body)["choices"][0]["text"]
            second = _post(port, "/v1/completions", body)["choices"][0]["text"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:external_prefix_cache_hits_total"))
    assert first == second == reference[0]
    assert hits >= 600  # PROMPTS[0] is ~680 tokens: all but the last come from kvtier the second time


def test_shared_fs_tier_between_instances(
    vllm_env: dict[str, str], model_dir: Path, reference: list[str], tmp_path: Path
) -> None:
    """Instance A stores into a shared-filesystem tier; instance B (another process, its own empty CPU
    tier, no disk tier) hits on what A stored."""
    extra = _kvtier_extra(fs={"enabled": True, "path": str(tmp_path / "shared"), "fsync": False})
    args = {"model": str(model_dir), "extra": extra, "prompts": PROMPTS[1:3], "max_tokens": MAX_TOKENS}
    a = _run_process(args, vllm_env)
    b = _run_process(args, vllm_env)
    assert [r[0] for r in a] == [r[0] for r in b] == reference[1:3]
    assert all(r[2] == 0 for r in a)
    assert all(r[2] == r[1] - 1 for r in b)
