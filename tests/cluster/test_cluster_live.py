"""Controller + 3 worker processes (A, B, C; C has a disk tier) on loopback. Tests run in file order
and share the cluster; each uses its own token sequences. The last test kills C."""

from __future__ import annotations

import time

import httpx
import pytest
from cluster_support import CHUNK, MODEL, TOKEN, TOKENIZER, TTL_S, Cluster, tokens, wait_until


def held(cluster: Cluster, toks: list[int], expect: dict[str, int], timeout_s: float = 5.0) -> None:
    """Wait until the controller's lookup of ``toks`` reports exactly ``expect``."""
    wait_until(lambda: cluster.lookup(toks) == expect, timeout_s, f"lookup == {expect} (last {cluster.lookup(toks)})")


def test_instances_registered(cluster: Cluster) -> None:
    resp = cluster.http.get("/instances")
    assert resp.status_code == 200
    infos = {i["instance_id"]: i for i in resp.json()["instances"]}
    assert set(infos) == {"A", "B", "C"}
    for info in infos.values():
        assert info["model"] == MODEL and info["chunk_tokens"] == CHUNK
        assert info["p2p_address"].startswith("127.0.0.1:")
        assert "raw" in info["codecs"]
    health = httpx.get(f"{cluster.url}/health").json()  # public, no token
    assert health["status"] == "ok" and health["instances"] == 3


def test_lookup_reports_each_instances_prefix(cluster: Cluster) -> None:
    t = tokens(1, 5 * CHUNK)
    assert cluster["A"].call("store", t)["cached"] == 80
    assert cluster["B"].call("store", t[:48])["cached"] == 48
    held(cluster, t, {"A": 80, "B": 48})
    resp = cluster.http.post("/lookup", json={"model": MODEL, "token_ids": t}).json()
    assert resp["best"] == "A" and resp["num_tokens"] == 80 and resp["instances"]["B"]["hit_chunks"] == 3
    # a stored partial last chunk hits only a prompt ending on the same token
    p = tokens(2, 2 * CHUNK + 8)
    cluster["A"].call("store", p)
    held(cluster, p, {"A": 40})
    assert cluster.lookup([*p, 7]) == {"A": 32}
    assert cluster.lookup(tokens(3, 64)) == {}


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="embedded model tokenizer not converted on this machine")
def test_lookup_by_text(cluster: Cluster) -> None:
    from tokenizers import Tokenizer

    text = "kvtier shares KV caches between engine instances. " * 8
    ids = Tokenizer.from_file(str(TOKENIZER)).encode(text).ids
    cluster["B"].call("store", ids)
    expect = {"B": len(ids)}
    wait_until(lambda: cluster.http.post("/lookup", json={"model": MODEL, "text": text}).json()["instances"]
               == {k: {"hit_tokens": v, "hit_chunks": -(-v // CHUNK)} for k, v in expect.items()}, 5, "text lookup")


def test_lookup_and_command_errors_are_clear_4xx(cluster: Cluster) -> None:
    post = cluster.http.post
    resp = post("/lookup", json={"model": "other-model", "token_ids": [1, 2]})
    assert resp.status_code == 404 and "other-model" in resp.json()["detail"] and MODEL in resp.json()["detail"]
    for bad in ([-1], [2**32], ["x"], [1.5]):
        assert post("/lookup", json={"model": MODEL, "token_ids": bad}).status_code == 422
    assert post("/lookup", json={"model": MODEL}).status_code == 422
    assert post("/lookup", json={"model": MODEL, "token_ids": [1], "text": "a"}).status_code == 422
    resp = post("/clear", json={"instance_id": "nope"})
    assert resp.status_code == 404 and "nope" in resp.json()["detail"]
    assert post("/move", json={"source": "A", "destination": "A"}).status_code == 422
    resp = post("/compress", json={"instance_id": "A", "codec": "no-such-codec"})
    assert resp.status_code == 422 and "no-such-codec" in resp.json()["detail"]
    resp = post("/check_finish", json={"op_id": "clear-0000"})
    assert resp.status_code == 404


def test_auth_on_every_mutating_route(cluster: Cluster) -> None:
    t = tokens(1, 5 * CHUNK)
    bodies = {
        "/clear": {"instance_id": "A"},
        "/pin": {"instance_id": "A", "token_ids": t},
        "/unpin": {"instance_id": "A", "token_ids": t},
        "/move": {"source": "A", "destination": "B"},
        "/compress": {"instance_id": "A", "codec": "raw"},
        "/v1/worker/register": {},
    }
    for route, body in bodies.items():
        assert httpx.post(f"{cluster.url}{route}", json=body).status_code == 401, route
        wrong = httpx.post(f"{cluster.url}{route}", json=body, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 403, route
    assert httpx.get(f"{cluster.url}/instances").status_code == 401
    assert cluster.lookup(t) == {"A": 80, "B": 48}  # nothing happened


def test_pinned_chunks_survive_eviction_pressure(cluster: Cluster) -> None:
    a = cluster["A"]
    p = tokens(10, 4 * CHUNK)
    a.call("store", p)
    op = cluster.op("/pin", instance_id="A", token_ids=p)
    assert op["status"] == "done" and op["result"]["pinned_tokens"] == 64
    evictions = a.call("stats")["stats"]["cpu"].get("evictions", 0)
    a.call("store", tokens(11, 40 * CHUNK))  # more than the 32-chunk CPU tier
    assert a.call("stats")["stats"]["cpu"]["evictions"] > evictions
    got = a.call("retrieve", p)
    assert got["hit"] == 64 and got["equal"]
    op = cluster.op("/unpin", instance_id="A", token_ids=p)
    assert op["status"] == "done" and op["result"]["unpinned_tokens"] == 64
    a.call("store", tokens(12, 40 * CHUNK))
    assert a.call("lookup", p)["hit"] == 0  # unpinned: evicted like any other chunk
    held(cluster, p, {})


def test_move_copies_then_moves(cluster: Cluster) -> None:
    m = tokens(20, 3 * CHUNK)
    cluster["A"].call("store", m)
    held(cluster, m, {"A": 48})
    op = cluster.op("/move", source="A", destination="B", token_ids=m)
    assert op["status"] == "done", op
    assert op["result"]["chunks"] == 3 and op["result"]["tokens"] == 48
    held(cluster, m, {"A": 48, "B": 48})
    fetched_before = cluster["B"].call("stats")["stats"]["p2p"].get("fetched", 0)
    got = cluster["B"].call("retrieve", m)
    assert got["hit"] == 48 and got["equal"]
    assert cluster["B"].call("stats")["stats"]["p2p"].get("fetched", 0) == fetched_before  # served locally

    m2 = tokens(21, 2 * CHUNK)
    cluster["A"].call("store", m2)
    held(cluster, m2, {"A": 32})
    op = cluster.op("/move", source="A", destination="B", token_ids=m2, copy=False)
    assert op["status"] == "done" and op["result"]["removed_from_source"] == 2
    held(cluster, m2, {"B": 32})

    op = cluster.op("/move", source="A", destination="C")  # no tokens: everything A reported
    assert op["status"] == "done" and op["result"]["chunks"] + op["result"]["already_present"] >= 3


def test_compress_reencodes_into_the_disk_tier(cluster: Cluster) -> None:
    c = cluster["C"]
    z = tokens(30, 4 * CHUNK)
    c.call("store", z)
    codecs = cluster.http.get("/instances").json()["instances"][2]["codecs"]
    codec = next((name for name in ("zstd", "lz4") if name in codecs), "raw")
    op = cluster.op("/compress", instance_id="C", codec=codec, token_ids=z)
    assert op["status"] == "done", op
    result = op["result"]
    assert result["chunks"] == 4 and result["tiers"] == ["disk"] and result["tier_writes_failed"] == 0
    assert result["codec"] == codec and result["encoded_bytes"] > 0
    op = cluster.op("/clear", instance_id="C", tier="cpu")  # the disk copy stays
    assert op["status"] == "done" and op["result"]["removed"] >= 4
    got = c.call("retrieve", z)  # promoted from disk, decoded with the new codec
    assert got["hit"] == 64 and got["equal"]


def test_clear_all_tiers(cluster: Cluster) -> None:
    z = tokens(30, 4 * CHUNK)
    held(cluster, z, {"C": 64})
    op = cluster.op("/clear", instance_id="C", tier="all")
    assert op["status"] == "done" and op["result"]["removed"] >= 4
    held(cluster, z, {})
    assert cluster["C"].call("lookup", z)["hit"] == 0


def test_check_finish_tracks_async_operations(cluster: Cluster) -> None:
    resp = cluster.http.post("/health", json={"instance_id": "B"})
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    assert resp.json()["detail"]["cpu_capacity_bytes"] > 0
    resp = cluster.http.post("/clear", json={"instance_id": "C", "tier": "cpu"})  # wait_s = 0
    assert resp.status_code in (200, 202)
    op_id = resp.json()["op_id"]

    def finished() -> bool:
        status = cluster.http.post("/check_finish", json={"op_id": op_id}).json()["status"]
        return status == "done"

    wait_until(finished, 5, "clear op done")


def test_p2p_fetch_serves_b_from_a(cluster: Cluster) -> None:
    q = tokens(40, 5 * CHUNK)
    cluster["A"].call("store", q)
    held(cluster, q, {"A": 80})
    before = cluster["B"].call("stats")["stats"]["p2p"].get("fetched", 0)
    got = cluster["B"].call("retrieve", q)
    assert got == {**got, "hit": 80, "equal": True, "untouched": True}
    assert cluster["B"].call("stats")["stats"]["p2p"]["fetched"] - before == 5
    again = cluster["B"].call("retrieve", q)  # now local: no network
    assert again["hit"] == 80 and again["equal"]
    assert cluster["B"].call("stats")["stats"]["p2p"]["fetched"] - before == 5
    held(cluster, q, {"A": 80, "B": 80})


def test_metrics_endpoints(cluster: Cluster) -> None:
    text = httpx.get(f"http://127.0.0.1:{cluster['B'].info['metrics_port']}/metrics").text
    for needle in ('kvtier_lookup_tokens_total{result="hit"}', 'kvtier_retrieve_tokens_total{result="hit"}',
                   'kvtier_operation_seconds_bucket{le="0.001",op="retrieve"}', 'kvtier_evictions_total{tier="cpu"}',
                   'kvtier_tier_reads_total{result="hit",tier="p2p"}', "kvtier_tier_operation_seconds_count",
                   'kvtier_store_queue_depth', 'kvtier_stat{name="events_sent",section="agent"}'):
        assert needle in text, needle
    hits = [line for line in text.splitlines() if line.startswith('kvtier_tier_reads_total{result="hit",tier="p2p"}')]
    assert float(hits[0].split()[-1]) >= 5
    ctl = cluster.http.get("/metrics").text
    assert "kvtier_controller_instances 3.0" in ctl and "kvtier_controller_http_requests_total" in ctl
    assert httpx.get(f"{cluster.url}/metrics").status_code == 401


def test_dead_peer_is_a_fast_miss_then_expires(cluster: Cluster) -> None:
    r = tokens(50, 5 * CHUNK)
    cluster["C"].call("store", r)
    held(cluster, r, {"C": 80})
    cluster["C"].kill()
    killed = time.monotonic()
    got = cluster["B"].call("retrieve", r)  # C still in the index, but unreachable
    assert got["hit"] == 0 and got["untouched"] and got["seconds"] < 1.0, got
    again = cluster["B"].call("retrieve", r)
    assert again["hit"] == 0 and again["seconds"] < 1.0
    wait_until(lambda: "C" not in {i["instance_id"] for i in cluster.http.get("/instances").json()["instances"]},
               TTL_S + 3, "C expired")
    gone_after = time.monotonic() - killed
    assert gone_after < TTL_S + 2.5
    assert cluster.lookup(r) == {}
    assert cluster.http.post("/clear", json={"instance_id": "C"}).status_code == 404
    assert TOKEN  # the other workers still answer
    assert cluster["B"].call("lookup", r)["hit"] == 0
