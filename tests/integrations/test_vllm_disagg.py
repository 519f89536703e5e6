"""Disaggregated prefill through ``kvtier router --prefill --decode`` on real vLLM servers: a prefiller
(``kv_role=kv_producer``) and a decoder (``kv_consumer``) share a real ``kvtier server`` tier. The
prompt is prefilled on the prefiller (``max_tokens=1``), its KV reaches the decoder through kvtier
(the decoder's ``vllm:external_prefix_cache_hits`` counter), and the streamed greedy output equals vLLM
alone. Skipped without vLLM."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import vllm_support
from vllm_support import MAX_TOKENS, PROMPTS

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
vllm_env = vllm_support.vllm_env
reference = vllm_support.reference


def test_prefill_on_one_instance_decode_on_another(tmp_path: Path, model_dir: Path, reference: list[str]) -> None:
    from kvtier.bench.router import SERVED, kvtier_service, stream_completion, vllm_metric, vllm_service

    started = []
    try:
        server = kvtier_service(["server", "--port", "0", "--capacity", "512MiB", "--log-level", "warning"],
                                tmp_path / "server.log")
        started.append(server)
        shared = {"chunk_tokens": 256, "cpu": {"capacity": "256MiB"},
                  "remote": {"enabled": True, "port": int(server.url.rsplit(":", 1)[1]), "timeout_s": 10.0}}
        prefill = vllm_service(model_dir, tmp_path / "prefill.log", shared, "kv_producer")
        decode = vllm_service(model_dir, tmp_path / "decode.log", shared, "kv_consumer")
        started += [prefill, decode]
        prefill.wait_healthy(400)
        decode.wait_healthy(400)
        router = kvtier_service(["router", "--port", "0", "--prefill", prefill.url, "--decode", decode.url,
                                 "--backend-header"],
                                tmp_path / "router.log")
        started.append(router)
        for n in (0, 1):
            hits_before = vllm_metric(decode.url, "vllm:external_prefix_cache_hits")
            prefilled_before = vllm_metric(prefill.url, "vllm:prompt_tokens")
            body = {"model": SERVED, "prompt": PROMPTS[n], "max_tokens": MAX_TOKENS, "temperature": 0}
            text, _ttft, _gaps, headers = stream_completion(router.url, body)
            assert headers["x-kvtier-backend"] == "decode-0"  # the decoder (by its opaque name)
            assert text == reference[n]
            prompt_tokens = vllm_metric(prefill.url, "vllm:prompt_tokens") - prefilled_before
            loaded = vllm_metric(decode.url, "vllm:external_prefix_cache_hits") - hits_before
            assert prompt_tokens >= 300  # the prefiller computed the prompt
            assert loaded >= 256  # the decoder loaded (at least) the whole chunks from kvtier
        metrics = httpx.get(f"{router.url}/metrics", timeout=10).text
        prefills = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("kvtier_router_requests_total") and 'role="prefill"' in line
                       and 'code="200"' in line)
        assert prefills == 2
    finally:
        for svc in reversed(started):
            svc.stop()
