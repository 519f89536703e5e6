"""A vLLM engine with kvtier joins a real ``kvtier controller`` (``cluster.enabled``).

vLLM starts and serves while the controller is down (the agent only retries); once the controller is
up the agent registers, and the controller's ``/lookup`` reports the vLLM instance's cached prefix of
each prompt it served; after :func:`reset_engines` the instance is gone from the controller.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import (
    CONTROLLER_TOKEN,
    PROMPTS,
    _close,
    _connector,
    _kvtier_extra,
    _make_llm,
    controller,
    controller_call,
    free_port,
)

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
vllm_env = vllm_support.vllm_env
reference = vllm_support.reference

MODEL = "smol-cluster"
INSTANCE = "vllm-a"


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s}s"
        time.sleep(0.1)


def _lookup(url: str, token_ids: list[int]) -> tuple[int, dict[str, Any]]:
    return controller_call(url, "/lookup", {"model": MODEL, "token_ids": token_ids})


def _generate_ids(llm: Any, prompts: list[str]) -> list[tuple[str, list[int]]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    return [(o.outputs[0].text, list(o.prompt_token_ids)) for o in outs]


def test_controller_lookup_reports_vllm_hits(vllm_env: dict[str, str], model_dir: Path, reference: list[str],
                                             tmp_path: Path) -> None:
    from kvtier.integrations.vllm import reset_engines

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = _kvtier_extra(cluster={"enabled": True, "controller_url": url, "instance_id": INSTANCE,
                                   "token": CONTROLLER_TOKEN})
    extra["kvtier_model_id"] = MODEL
    reset_engines()
    llm = _make_llm(model_dir, extra, enable_prefix_caching=False)
    with contextlib.ExitStack() as stack:
        stack.callback(reset_engines)  # also on failure: stop the agent, close the engine and the LLM
        stack.callback(_close, llm)
        agent = _connector().agent
        assert agent is not None and agent.config.instance_id == INSTANCE
        before = _generate_ids(llm, PROMPTS[:2])  # the controller is not running yet
        assert [t for t, _ids in before] == reference[:2]
        _wait_until(lambda: agent.counters["controller_errors"] > 0, 30, "a failed registration")
        assert not agent.wait_registered(0)

        stack.enter_context(controller(port, tmp_path / "controller.log"))
        assert agent.wait_registered(60), agent.counters
        # the registration snapshot carries what was stored while the controller was down
        for _text, ids in before:
            _wait_until(lambda ids=ids: _lookup(url, ids)[1].get("instances", {}).get(INSTANCE, {})
                        .get("hit_tokens") == len(ids), 30, "the snapshot's hits")
        after = _generate_ids(llm, PROMPTS[2:3])  # reported through admit events
        assert after[0][0] == reference[2]
        ids = after[0][1]
        _wait_until(lambda: _lookup(url, ids)[1].get("best") == INSTANCE, 30, "the admit events")
        _status, found = _lookup(url, ids)
        assert found["instances"][INSTANCE] == {"hit_tokens": len(ids), "hit_chunks": -(-len(ids) // 256)}
        # a prompt that shares only the first whole chunks of PROMPTS[0]: the controller says so
        prefix = [*before[0][1][:300], 11, 12, 13]
        assert _lookup(url, prefix)[1]["instances"][INSTANCE]["hit_tokens"] == 256
        _close(llm)
        reset_engines()  # stops the agent: it deregisters
        assert _lookup(url, ids)[0] == 404  # no live instance serves the model any more
