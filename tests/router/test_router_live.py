"""``kvtier router`` processes in front of fake OpenAI upstreams, with a real ``kvtier controller`` and
real cluster workers as the source of what is cached where. Tests share the cluster and use their own
token sequences."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from router_support import (
    CHUNK,
    MODEL,
    TOKEN,
    TOKENIZER,
    Cluster,
    Proc,
    dead_url,
    metric,
    sse_events,
    start_router,
    tokens,
    wait_until,
)

BODY = {"model": "fake", "max_tokens": 3}


def held(cluster: Cluster, toks: list[int], expect: dict[str, int]) -> None:
    def now() -> dict[str, int]:
        resp = cluster.controller.http.post("/lookup", json={"model": MODEL, "token_ids": toks},
                                            headers={"Authorization": f"Bearer {TOKEN}"})
        return {i: h["hit_tokens"] for i, h in resp.json()["instances"].items()}

    wait_until(lambda: now() == expect, 10, f"controller lookup == {expect}")


def served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["text"]).split(":")[0]


@pytest.fixture(scope="module")
def kv_router(cluster: Cluster) -> Iterator[Proc]:
    args = ["--backend", cluster.backend("A"), "--backend", cluster.backend("B"), "--controller",
            cluster.controller.url, "--kv-model", MODEL, "--chunk-tokens", str(CHUNK), "--backend-header",
            "--lookup-timeout", "5"]  # routing by hits must not depend on the machine's load (default 0.25 s)
    if TOKENIZER.is_file():
        args += ["--tokenizer", str(TOKENIZER.parent)]
    router = start_router(cluster.logs, "kv", *args)
    yield router
    router.stop()


def test_longest_cached_prefix_wins(cluster: Cluster, kv_router: Proc) -> None:
    t = tokens(100, 5 * CHUNK)
    cluster.workers["A"].call("store", t[: 3 * CHUNK])
    cluster.workers["B"].call("store", t)
    u = tokens(101, 4 * CHUNK)
    cluster.workers["A"].call("store", u)
    cluster.workers["B"].call("store", u[:CHUNK])
    held(cluster, t, {"A": 48, "B": 80})
    held(cluster, u, {"A": 64, "B": 16})
    for _ in range(3):
        assert served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": t})) == "B"
        assert served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": [*u, 7, 8]})) == "A"
    text = kv_router.http.get("/metrics").text
    assert metric(text, "kvtier_router_decisions_total", reason="controller_hit") == 6
    assert metric(text, "kvtier_router_requests_total", backend=cluster.fleet.url("B"), code="200") >= 3


def test_equal_hits_and_misses_go_to_the_least_loaded(cluster: Cluster, kv_router: Proc) -> None:
    a, b = cluster.fleet["A"], cluster.fleet["B"]
    only_a = tokens(110, 3 * CHUNK)
    both = tokens(111, 2 * CHUNK)
    cluster.workers["A"].call("store", only_a)
    for w in ("A", "B"):
        cluster.workers[w].call("store", both)
    held(cluster, only_a, {"A": 48})
    held(cluster, both, {"A": 32, "B": 32})
    a.allowed = a.sent_events + 1  # A's streams stall after one event: the request stays in flight on A
    with kv_router.http.stream("POST", "/v1/completions", json={**BODY, "prompt": only_a, "stream": True,
                                                                  "max_tokens": 2}) as slow:
        lines = slow.iter_lines()  # one iterator: dropping one closes the response
        first = next(lines)
        assert '"A:0 ' in first and a.active == 1
        for seed in range(120, 124):  # misses
            assert served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": tokens(seed, 40)})) == "B"
        for _ in range(3):  # equal hits
            assert served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": both})) == "B"
        a.allowed = None
        rest = "\n".join(lines)
    assert '"A:1 ' in rest and "[DONE]" in rest and a.cancelled == 0 and b.cancelled == 0
    # with the load gone, the next equal-hit requests use both
    assert {served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": both})) for _ in range(4)} \
        == {"A", "B"}


def test_streaming_passthrough_chunk_by_chunk_and_disconnect_cancels(cluster: Cluster, kv_router: Proc) -> None:
    b = cluster.fleet["B"]
    doc = tokens(130, 4 * CHUNK)
    cluster.workers["B"].call("store", doc)
    held(cluster, doc, {"B": 64})
    b.allowed = b.sent_events + 1
    with kv_router.http.stream("POST", "/v1/completions", json={**BODY, "prompt": doc, "stream": True,
                                                                  "max_tokens": 5}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-kvtier-backend"] == "B"  # its opaque name (the instance id), not its URL
        lines = (line for line in resp.iter_lines() if line)
        for i in range(5):
            event = next(lines)
            # the client holds event i while the upstream has sent no more than i + 1 events
            assert f'"B:{i} ' in event and b.sent_events == b.allowed
            b.allow()
        assert next(lines) == "data: [DONE]"
    b.allowed = b.sent_events + 1
    cancelled = b.cancelled
    with kv_router.http.stream("POST", "/v1/completions", json={**BODY, "prompt": doc, "stream": True,
                                                                  "max_tokens": 50}) as resp:
        lines = resp.iter_lines()
        assert '"B:0 ' in next(lines)
    wait_until(lambda: b.cancelled == cancelled + 1, 10, "upstream stream cancelled")
    b.allowed = None
    wait_until(lambda: metric(kv_router.http.get("/metrics").text, "kvtier_router_inflight") == 0, 10,
               "router in-flight count back to 0")


def test_models_and_health(cluster: Cluster, kv_router: Proc) -> None:
    models = kv_router.http.get("/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "fake"
    health = kv_router.http.get("/health").json()
    assert health == {"status": "ok", "backends": 2, "healthy": 2}
    assert kv_router.http.post("/v1/completions", content=b"{not json").status_code == 400
    assert kv_router.http.post("/v1/completions", json=[1, 2]).status_code == 400


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="embedded model tokenizer not converted on this machine")
def test_text_and_chat_prompts_are_tokenized_like_vllm(cluster: Cluster, kv_router: Proc) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER.parent), local_files_only=True)
    text = "The router sends each prompt to the engine that already holds its prefix. " * 6
    cluster.workers["A"].call("store", tok(text)["input_ids"])  # vLLM: completions add special tokens
    messages = [{"role": "user", "content": "Which engine holds this conversation? " * 8}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]  # vLLM: the template has them
    cluster.workers["B"].call("store", chat_ids)
    held(cluster, chat_ids, {"B": len(chat_ids)})
    for _ in range(2):
        assert served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": text + " Why?"})) == "A"
        resp = kv_router.http.post("/v1/chat/completions", json={**BODY, "messages": messages})
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"].startswith("B:")


def test_prompts_unknown_to_the_controller_follow_the_routers_table(cluster: Cluster, kv_router: Proc) -> None:
    """The controller answers but knows no prefix (its index lags the engines): the router's table of
    where it sent the prompt decides."""
    before = metric(kv_router.http.get("/metrics").text, "kvtier_router_decisions_total", reason="table_hit")
    for seed in range(170, 174):
        doc = tokens(seed, 3 * CHUNK)
        where = served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": doc}))
        again = served_by(kv_router.http.post("/v1/completions", json={**BODY, "prompt": [*doc, 1, 2]}))
        assert again == where
    after = metric(kv_router.http.get("/metrics").text, "kvtier_router_decisions_total", reason="table_hit")
    assert after - before == 4


def test_controller_down_falls_back_to_the_routers_prefix_table(cluster: Cluster) -> None:
    router = start_router(cluster.logs, "no-controller", "--backend", cluster.backend("A"), "--backend",
                          cluster.backend("B"), "--controller", dead_url(), "--lookup-timeout", "0.2",
                          "--kv-model", MODEL, "--chunk-tokens", str(CHUNK))
    try:
        first: dict[int, str] = {}
        for seed in range(140, 146):
            doc = tokens(seed, 3 * CHUNK)
            first[seed] = served_by(router.http.post("/v1/completions", json={**BODY, "prompt": doc}))
        assert set(first.values()) == {"A", "B"}  # misses are spread by load
        for seed, where in first.items():
            follow_up = tokens(seed, 3 * CHUNK) + tokens(seed + 1000, 20)
            assert served_by(router.http.post("/v1/completions", json={**BODY, "prompt": follow_up})) == where
        text = router.http.get("/metrics").text
        assert metric(text, "kvtier_router_decisions_total", reason="table_hit") == 6
        assert metric(text, "kvtier_router_controller_lookups_total", outcome="failed") >= 1
    finally:
        router.stop()


def test_dead_backend_is_skipped_then_502_and_503(cluster: Cluster) -> None:
    dead = dead_url()
    router = start_router(cluster.logs, "dead", "--backend", dead, "--backend", cluster.backend("A"),
                          "--policy", "roundrobin")
    try:
        for i in range(6):
            assert served_by(router.http.post("/v1/completions", json={**BODY, "prompt": tokens(150 + i, 20)})) == "A"
        text = router.http.get("/metrics").text
        assert metric(text, "kvtier_router_errors_total", backend=dead, kind="connect") == 1  # then backed off
        assert metric(text, "kvtier_router_backend_healthy", backend=dead) == 0
        assert router.http.get("/health").json()["healthy"] == 1
    finally:
        router.stop()
    router = start_router(cluster.logs, "all-dead", "--backend", dead, "--backend", dead_url())
    try:
        failed = router.http.post("/v1/completions", json={**BODY, "prompt": [1, 2, 3]})
        assert failed.status_code == 502 and "failed" in failed.json()["error"]["message"]
        unavailable = router.http.post("/v1/completions", json={**BODY, "prompt": [1, 2, 3]})
        assert unavailable.status_code == 503 and int(unavailable.headers["retry-after"]) >= 1
        assert router.http.get("/health").status_code == 503
    finally:
        router.stop()


def test_token_required_off_loopback(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    refused = subprocess.run([sys.executable, "-m", "kvtier.cli", "router", "--host", "0.0.0.0", "--port", "0",
                              "--backend", cluster.fleet.url("A")], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in __import__("os").environ.items() if k != "KVTIER_ROUTER_TOKEN"})
    assert refused.returncode != 0 and "loopback" in refused.stderr
    router = start_router(cluster.logs, "auth", "--host", "0.0.0.0", "--backend", cluster.backend("A"),
                          env={"KVTIER_ROUTER_TOKEN": "router-secret"})
    try:
        body = {**BODY, "prompt": [1, 2, 3]}
        assert router.http.post("/v1/completions", json=body).status_code == 401
        wrong = router.http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        for route in ("/metrics", "/v1/models"):
            assert router.http.get(route).status_code == 401
        a = cluster.fleet["A"]
        ok = router.http.post("/v1/completions", json=body, headers={"Authorization": "Bearer router-secret"})
        assert served_by(ok) == "A"
        assert a.bodies[-1] == body  # forwarded as sent
        assert router.http.get("/health").status_code == 200  # public
    finally:
        router.stop()


def test_body_and_concurrency_caps(cluster: Cluster) -> None:
    router = start_router(cluster.logs, "caps", "--backend", cluster.backend("A"), "--max-body-bytes", "2000",
                          "--max-concurrent", "1")
    a = cluster.fleet["A"]
    try:
        big = router.http.post("/v1/completions", json={**BODY, "prompt": "x" * 3000})
        assert big.status_code == 413
        assert served_by(router.http.post("/v1/completions", json={**BODY, "prompt": "x" * 1500})) == "A"
        a.allowed = a.sent_events + 1
        with router.http.stream("POST", "/v1/completions", json={**BODY, "prompt": [5], "stream": True}) as slow:
            lines = slow.iter_lines()
            next(lines)
            busy = router.http.post("/v1/completions", json={**BODY, "prompt": [6]})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            a.allowed = None
            assert "[DONE]" in "\n".join(lines)
        assert served_by(router.http.post("/v1/completions", json={**BODY, "prompt": [6]})) == "A"
        assert metric(router.http.get("/metrics").text, "kvtier_router_rejected_total", reason="busy") == 1
    finally:
        a.allowed = None
        router.stop()


def test_disaggregated_prefill_then_streamed_decode(cluster: Cluster) -> None:
    p, d = cluster.fleet["P"], cluster.fleet["D"]
    router = start_router(cluster.logs, "disagg", "--prefill", cluster.fleet.url("P"), "--decode",
                          cluster.fleet.url("D"))
    try:
        body = {**BODY, "prompt": tokens(160, 40), "stream": True, "max_tokens": 4,
                "stream_options": {"include_usage": True}}
        resp = router.http.post("/v1/completions", json=body)
        assert resp.status_code == 200
        assert [e["choices"][0]["text"] for e in sse_events(resp.text)] == [f"D:{i} " for i in range(4)]
        assert p.bodies[-1] == {**{k: v for k, v in body.items() if k != "stream_options"}, "max_tokens": 1,
                                "stream": False}
        assert d.bodies[-1] == body
        chat = {**BODY, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
        assert router.http.post("/v1/chat/completions", json=chat).status_code == 200
        assert p.bodies[-1]["max_completion_tokens"] == 1 and d.bodies[-1]["max_completion_tokens"] == 9
        health = router.http.get("/health").json()
        assert health["prefill_backends"] == 1 and health["prefill_healthy"] == 1
    finally:
        router.stop()
    router = start_router(cluster.logs, "disagg-dead", "--prefill", dead_url(), "--decode", cluster.fleet.url("D"))
    try:
        served = len(d.bodies)
        resp = router.http.post("/v1/completions", json={**BODY, "prompt": [1, 2, 3]})
        assert resp.status_code == 200 and len(d.bodies) == served + 1  # decoded without a prefill
        text = router.http.get("/metrics").text
        assert metric(text, "kvtier_router_errors_total", kind="prefill_unavailable") == 1
    finally:
        router.stop()
