"""Scheduler-side rules of the vLLM connector, driven with fake requests (no vLLM needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kvtier.integrations.vllm.plan import Planner, StepPlan

C = 16


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    blocks: list[int] = field(default_factory=lambda: list(range(100)))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def _planner(stored: int, partial: bool = True) -> Planner:
    """A planner whose kvtier holds the first ``stored`` tokens of any request."""
    return Planner(lambda tokens: min(stored, len(tokens)), C, save_partial=partial)


def _step(p: Planner, req: FakeRequest, scheduled: int, finished: tuple[str, ...] = (),
          preempted: tuple[str, ...] = ()) -> StepPlan:
    plan = p.plan({req.request_id: scheduled}, finished, preempted, lambda _id: req.blocks)
    req.num_computed_tokens += scheduled  # what vLLM does right after build_connector_meta
    return plan


def test_full_hit_leaves_last_token_and_loads_once() -> None:
    req = FakeRequest("a", list(range(40)), 40)
    p = _planner(stored=40)
    assert p.lookup(req, 0) == 39
    p.allocated(req, 39)
    req.num_computed_tokens = 39
    plan = _step(p, req, 1)
    assert [(ld.start, ld.end, len(ld.tokens)) for ld in plan.loads] == [(0, 39, 40)]
    assert plan.saves == []  # everything was already stored
    assert _step(p, req, 1).loads == []  # decode step: nothing


def test_local_prefix_cache_hit_loads_only_the_rest() -> None:
    req = FakeRequest("a", list(range(50)), 50)
    p = _planner(stored=48)
    assert p.lookup(req, 32) == 16  # vLLM has 32 tokens itself
    p.allocated(req, 16)
    req.num_computed_tokens = 48
    plan = _step(p, req, 2)
    assert [(ld.start, ld.end) for ld in plan.loads] == [(32, 48)]
    assert [(s.skip, len(s.tokens)) for s in plan.saves] == [(48, 50)]  # the partial last chunk


def test_chunked_prefill_stores_whole_chunks_then_the_partial_one() -> None:
    req = FakeRequest("a", list(range(70)), 70)
    p = _planner(stored=0)
    assert p.lookup(req, 0) == 0
    p.allocated(req, 0)
    saves = []
    for scheduled in (20, 20, 20, 10):
        plan = _step(p, req, scheduled)
        assert plan.loads == []
        saves += [(s.skip, len(s.tokens)) for s in plan.saves]
    assert saves == [(0, 16), (16, 32), (32, 48), (48, 70)]
    req.all_token_ids.append(5)  # decode tokens are never stored
    assert _step(p, req, 1).saves == []


def test_no_partial_chunk_when_disabled_and_short_prompts() -> None:
    req = FakeRequest("a", list(range(40)), 40)
    p = _planner(stored=0, partial=False)
    p.lookup(req, 0)
    p.allocated(req, 0)
    assert [len(s.tokens) for s in _step(p, req, 40).saves] == [32]
    short = FakeRequest("b", [1, 2, 3], 3)
    p2 = _planner(stored=0)
    p2.lookup(short, 0)
    p2.allocated(short, 0)
    assert [(s.skip, len(s.tokens)) for s in _step(p2, short, 3).saves] == [(0, 3)]
    one = FakeRequest("c", [7], 1)
    assert _planner(stored=1).lookup(one, 0) == 0  # a one-token prompt is always computed


def test_failed_load_regression_restores_recomputed_chunks() -> None:
    req = FakeRequest("a", list(range(64)), 64)
    p = _planner(stored=64)
    p.allocated(req, p.lookup(req, 0))
    req.num_computed_tokens = 63
    assert _step(p, req, 1).loads
    # the load failed at block 1 (block size 16): vLLM truncates num_computed_tokens to 16 and recomputes
    req.num_computed_tokens = 16
    plan = _step(p, req, 48)
    assert plan.loads == []
    assert [(s.skip, len(s.tokens)) for s in plan.saves] == [(16, 64)]


def test_preempted_and_finished_requests_are_forgotten() -> None:
    req = FakeRequest("a", list(range(40)), 40)
    p = _planner(stored=0)
    p.lookup(req, 0)
    p.allocated(req, 0)
    _step(p, req, 20)
    assert len(p) == 1
    p.plan({}, (), ("a",), lambda _id: req.blocks)  # preempted: blocks freed, progress lost
    assert len(p) == 0
    req.num_computed_tokens = 0
    req.all_token_ids += [1, 2]  # resumed with two generated tokens: looked up again, all tokens
    p = Planner(lambda tokens: 32 if len(tokens) == 42 else 0, C)
    assert p.lookup(req, 0) == 32
    p.allocated(req, 32)
    req.num_computed_tokens = 32
    plan = _step(p, req, 10)
    assert [(ld.start, ld.end) for ld in plan.loads] == [(0, 32)]
    assert [(s.skip, len(s.tokens)) for s in plan.saves] == [(32, 40)]  # prompt only
    p.plan({}, ("a",), (), lambda _id: None)
    assert len(p) == 0
    p.forget("never-seen")  # aborting an unknown request is harmless


def test_readmitted_in_the_same_step_is_kept() -> None:
    req = FakeRequest("a", list(range(20)), 20)
    p = _planner(stored=0)
    p.lookup(req, 0)
    p.allocated(req, 0)
    plan = p.plan({"a": 20}, (), ("a",), lambda _id: req.blocks)
    assert len(p) == 1 and plan.saves


def test_granting_more_than_the_hit_is_refused() -> None:
    req = FakeRequest("a", list(range(20)), 20)
    p = _planner(stored=0)
    p.lookup(req, 0)
    with pytest.raises(ValueError):
        p.allocated(req, 5)


def test_inconsistent_grant_still_emits_a_failing_load() -> None:
    """vLLM counts granted tokens as computed; if the plan cannot be made, the load goes out empty so
    the worker reports its blocks as failed (never silently dropped)."""
    req = FakeRequest("a", list(range(40)), 40)
    p = _planner(stored=32)
    p.allocated(req, p.lookup(req, 0))
    req.num_computed_tokens = 36  # more than kvtier ever had
    plan = _step(p, req, 4)
    assert [(ld.tokens, ld.start, ld.end) for ld in plan.loads] == [([], 4, 36)]


def test_consumer_loads_but_never_stores() -> None:
    req = FakeRequest("a", list(range(40)), 40)
    p = Planner(lambda tokens: min(32, len(tokens)), C, store=False)
    assert p.lookup(req, 0) == 32
    p.allocated(req, 32)
    req.num_computed_tokens = 32
    plan = _step(p, req, 8)
    assert [(ld.start, ld.end) for ld in plan.loads] == [(0, 32)]
    assert plan.saves == []  # the prompt's last 8 tokens were computed here, yet nothing is stored
    assert _step(p, req, 1).saves == []


def test_lookup_runs_once_per_request_while_it_waits() -> None:
    """vLLM asks again every step a request waits for admission: one kvtier round trip is enough."""
    calls: list[int] = []

    def lookup(tokens: list[int]) -> int:
        calls.append(len(tokens))
        return 32

    p = Planner(lookup, C)
    req = FakeRequest("a", list(range(40)), 40)
    assert [p.lookup(req, 0) for _ in range(5)] == [32] * 5
    assert calls == [40]
    req.all_token_ids.append(7)  # the request changed: ask again
    assert p.lookup(req, 0) == 32 and calls == [40, 41]
    p.allocated(req, 32)
    p.forget("a")  # preempted or finished: a resumed request is looked up afresh
    p.lookup(req, 0)
    assert calls == [40, 41, 41]


def test_async_load_is_emitted_at_admission_and_tracked_until_reported() -> None:
    """With load_async vLLM admits the request without scheduling it: the load goes out in that very
    step, the first scheduled step loads nothing, and the request counts as loading until the worker
    reports it (so an abort meanwhile must keep its blocks)."""
    req = FakeRequest("a", list(range(50)), 50)
    p = Planner(lambda tokens: min(48, len(tokens)), C, load_async=True)
    assert p.lookup(req, 0) == 48
    p.allocated(req, 48)
    req.num_computed_tokens = 48  # vLLM counts the external tokens as computed at admission
    plan = p.plan({}, (), (), lambda _id: req.blocks)  # admitted, not scheduled: waits for its KV
    assert [(ld.start, ld.end, ld.is_async) for ld in plan.loads] == [(0, 48, True)]
    assert p.loading == {"a"}
    assert p.plan({}, (), (), lambda _id: req.blocks).loads == []  # emitted once
    p.loaded({"a"})
    assert p.loading == set()
    p.allocated(req, 0)  # vLLM schedules it now (and says so with no external tokens)
    plan = _step(p, req, 2)  # computes the rest, stores only the partial last chunk
    assert plan.loads == [] and [(s.skip, len(s.tokens)) for s in plan.saves] == [(48, 50)]


def test_sync_loads_unchanged_when_async_is_off() -> None:
    req = FakeRequest("a", list(range(40)), 40)
    p = _planner(stored=32)
    p.lookup(req, 0)
    p.allocated(req, 32)
    assert p.plan({}, (), (), lambda _id: req.blocks).loads == []  # nothing before it is scheduled
    req.num_computed_tokens = 32
    assert [(ld.start, ld.end, ld.is_async) for ld in _step(p, req, 8).loads] == [(0, 32, False)]
    assert p.loading == set()


def test_failed_async_load_is_not_offered_again() -> None:
    """vLLM frees the blocks of a request whose asynchronous load failed outright and admits it again:
    offering the same hit would fail the same way forever, so the retry recomputes."""
    req = FakeRequest("a", list(range(50)), 50)
    p = Planner(lambda tokens: min(48, len(tokens)), C, load_async=True)
    p.lookup(req, 0)
    p.allocated(req, 48)
    req.num_computed_tokens = 48
    p.plan({}, (), (), lambda _id: req.blocks)
    p.loaded({"a"})  # reported finished, its blocks reported invalid: vLLM resets and retries
    req.num_computed_tokens = 0
    assert p.lookup(req, 0) == 0
    p.allocated(req, 0)
    plan = _step(p, req, 50)
    assert plan.loads == [] and [(s.skip, len(s.tokens)) for s in plan.saves] == [(0, 50)]
    p.forget("a")  # a preempted or new request is looked up afresh
    assert p.lookup(req, 0) == 48
