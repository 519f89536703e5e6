"""Disaggregated prefill through a real ``kvtier server``: a ``kv_producer`` vLLM process prefills
(max_tokens=1) and leaves at once without flushing anything at exit; a ``kv_consumer`` vLLM process
(empty CPU tier, only the server below it) then generates exactly what vLLM alone generates, loading
all but the last prompt token, and stores nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import MAX_TOKENS, PROMPTS, _kvtier_extra, _run_process, cache_server

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
vllm_env = vllm_support.vllm_env
reference = vllm_support.reference


def _keys_on(server: Any) -> int:
    from kvtier.storage.remote import RemoteTier

    tier = RemoteTier("127.0.0.1", server.port, "", timeout_s=5.0, pool_size=1)
    try:
        stats = tier.server_stats()
    finally:
        tier.close()
    return int(stats["store_chunks_memory"])


def test_producer_then_consumer(vllm_env: dict[str, str], model_dir: Path, reference: list[str],
                                tmp_path: Path) -> None:
    with cache_server(tmp_path) as server:
        extra = _kvtier_extra(remote={"enabled": True, "port": server.port, "timeout_s": 10.0})
        base = {"model": str(model_dir), "extra": extra, "prompts": PROMPTS[:3]}
        prefill, produced = _run_process({**base, "max_tokens": 1, "kv_role": "kv_producer", "hard_exit": True},
                                         vllm_env)
        stored = _keys_on(server)
        # the consumer also gets a prompt nobody prefilled: it computes it and must not store it
        decode, consumed = _run_process({**base, "prompts": [*PROMPTS[:3], PROMPTS[3]], "max_tokens": MAX_TOKENS,
                                         "kv_role": "kv_consumer"}, vllm_env)
        assert _keys_on(server) == stored
    assert all(r[2] == 0 for r in prefill)  # a producer never loads
    assert all(ref.startswith(r[0]) and r[0] for r, ref in zip(prefill, reference, strict=False))
    assert produced.get("producer_flushes", 0) > 0 and "producer_flush_timeouts" not in produced
    assert stored > 0
    assert [r[0] for r in decode] == reference[:4]
    assert all(r[2] == r[1] - 1 for r in decode[:3])  # everything but the last token came from the prefiller
    assert decode[3][2] == 0
    assert consumed.get("loaded_tokens", 0) == sum(r[1] - 1 for r in decode[:3])
    assert "saved_tokens" not in consumed
