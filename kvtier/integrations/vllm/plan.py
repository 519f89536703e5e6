"""Scheduler-side planning of the vLLM connector: which tokens to load and to store, step by step.

Pure Python (no vLLM import), so the rules are unit-tested with fake requests. :class:`Planner` sees
the scheduler's calls in order — ``lookup`` (from ``get_num_new_matched_tokens``), ``allocated``
(``update_state_after_alloc``), ``plan`` (``build_connector_meta``), ``finished`` (``request_finished``)
— and reads from a request only ``request_id``, ``all_token_ids``, ``num_tokens``,
``num_prompt_tokens`` and ``num_computed_tokens`` (tokens computed before the step being planned;
vLLM advances it right after ``build_connector_meta``).

Rules (C = chunk_tokens):

- Hit = the kvtier lookup of all the request's tokens (whole chunks, or the whole sequence when its
  partial last chunk is stored), capped at ``num_tokens - 1``: vLLM computes the last token itself.
  vLLM asks again every step a request waits for admission; the lookup runs once per request and
  token count (a hit gone stale meanwhile is a failed load, recomputed like any other).
  External tokens = hit − what vLLM already has (its block-aligned local prefix-cache hit).
- A load covers ``[local, local + external)`` and is emitted once, in the request's first scheduled
  step after admission; it carries the token ids of the whole stored prefix so the stored chunks (a
  partial last one included) are found under their own keys. A load is never dropped once vLLM
  granted it: if it cannot be planned it goes out empty, and the worker reports its blocks as failed.
- Store after every step: the prompt's whole chunks computed by the end of the step, plus the partial
  last chunk once the whole prompt is computed (``save_partial``). Never decode tokens. Chunks below
  the request's known-cached prefix are skipped (``skip``, a multiple of C).
- If vLLM's computed count goes backwards (it recomputes after a failed load), the known-cached prefix
  drops to that point, so the recomputed chunks are stored again.
- Preempted, finished or aborted requests are forgotten; a resumed request is looked up afresh.
- ``store=False`` (vLLM's ``kv_consumer`` role) plans loads only, never a store.
- Asynchronous loads (``load_async=True``): vLLM admits the request but does not schedule it until the
  worker reports the load finished, so the load is emitted in the step of admission (``is_async``),
  not in the first scheduled step. Until that report (:meth:`Planner.loaded`) the request is
  ``loading``: if it finishes meanwhile (abort), vLLM must keep its blocks, which the worker is still
  writing (``request_finished`` then delays freeing; the worker's "finished receiving" report frees
  them). When such a load fails outright vLLM frees the blocks and admits the request again: kvtier
  then reports no hit for it, so it is recomputed instead of failing the same load in a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class RequestLike(Protocol):
    request_id: str
    num_computed_tokens: int
    num_prompt_tokens: int

    @property
    def all_token_ids(self) -> Any: ...

    @property
    def num_tokens(self) -> int: ...


@dataclass
class LoadReq:
    """Load positions ``[start, end)`` of ``tokens`` (the cached prefix as kvtier stored it;
    ``start < end <= len(tokens)``) into the request's blocks."""

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    is_async: bool = False  # load off the critical path; the worker reports it in get_finished


@dataclass
class SaveReq:
    """Store ``tokens`` (positions ``[0, len)``, all computed by the end of this step); chunks ending
    at or before ``skip`` are cached already and need not be copied."""

    req_id: str
    tokens: list[int]
    skip: int
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadReq] = field(default_factory=list)
    saves: list[SaveReq] = field(default_factory=list)


@dataclass
class _Tracker:
    request: RequestLike
    hit: int  # kvtier hit at admission, as stored (may end in a partial chunk)
    load: int  # external tokens vLLM granted (0 = nothing to load)
    saved: int  # prompt tokens known to be in kvtier
    admitted: bool = False  # its first step has been planned
    last_end: int = 0  # tokens computed at the end of the last planned step
    load_async: bool = False  # the load is emitted at admission, not in the first scheduled step


class Planner:
    """Per-request load/store plans. Not thread-safe: vLLM's scheduler calls it from one thread."""

    def __init__(self, lookup: Callable[[list[int]], int], chunk_tokens: int, save_partial: bool = True,
                 store: bool = True, load_async: bool = False) -> None:
        self._lookup = lookup
        self.chunk = chunk_tokens
        self.save_partial = save_partial
        self.store = store
        self.load_async = load_async
        self.loading: set[str] = set()  # asynchronous loads emitted and not yet reported finished
        self._trackers: dict[str, _Tracker] = {}
        self._hits: dict[str, tuple[int, int]] = {}  # request -> (num_tokens looked up, hit)

    def __len__(self) -> int:
        return len(self._trackers)

    def lookup(self, request: RequestLike, num_computed_tokens: int) -> int:
        """External tokens kvtier can supply beyond vLLM's ``num_computed_tokens`` (0 if none)."""
        num_tokens = int(request.num_tokens)
        tracker = self._trackers.get(request.request_id)
        if tracker is not None and tracker.load_async:
            # vLLM retries a request whose asynchronous load failed outright: recompute (and store
            # again) rather than fail the same load in a loop
            del self._trackers[request.request_id]
            self._hits[request.request_id] = (num_tokens, 0)
            return 0
        known = self._hits.get(request.request_id)
        if known is not None and known[0] == num_tokens:
            hit = known[1]
        else:
            hit = self._lookup(list(request.all_token_ids))
            self._hits[request.request_id] = (num_tokens, hit)
        need = min(hit, request.num_tokens - 1) - num_computed_tokens
        return max(need, 0)

    def allocated(self, request: RequestLike, num_external_tokens: int) -> None:
        """vLLM admitted ``request`` and will load ``num_external_tokens`` external tokens."""
        prior = self._trackers.get(request.request_id)
        if prior is not None and prior.load_async and num_external_tokens == 0:
            prior.load_async = False  # scheduled now that its asynchronous load is done: nothing changes
            return
        hit = self._hits.pop(request.request_id, (0, 0))[1]
        if num_external_tokens > hit:
            raise ValueError(f"vLLM granted {num_external_tokens} external tokens, kvtier had {hit}")
        self._trackers[request.request_id] = _Tracker(request, hit, num_external_tokens,
                                                      saved=min(hit, request.num_prompt_tokens),
                                                      load_async=self.load_async and num_external_tokens > 0)

    def forget(self, req_id: str) -> None:
        self._trackers.pop(req_id, None)
        self._hits.pop(req_id, None)

    def loaded(self, req_ids: Iterable[str]) -> None:
        """The worker reported these asynchronous loads finished (successfully or not)."""
        self.loading.difference_update(req_ids)

    def _load(self, tracker: _Tracker, req_id: str, block_ids: Callable[[str], list[int] | None],
              is_async: bool) -> LoadReq:
        """The load of a just-admitted request (vLLM already counts its external tokens as computed)."""
        request = tracker.request
        before = int(request.num_computed_tokens)
        start = before - tracker.load
        blocks = block_ids(req_id) or []
        tokens = list(request.all_token_ids[: tracker.hit])
        if not 0 <= start < before <= tracker.hit:
            # cannot happen with vLLM 0.32; if it does, an empty load makes the worker report the blocks
            # as failed so vLLM recomputes them (vLLM already counts them computed)
            tokens, start = [], max(start, 0)
        tracker.load = 0
        if is_async:
            self.loading.add(req_id)
        return LoadReq(req_id, tokens, start, before, blocks, is_async)

    def plan(self, num_scheduled_tokens: Mapping[str, int], finished: Iterable[str],
             preempted: Iterable[str], block_ids: Callable[[str], list[int] | None]) -> StepPlan:
        """The loads and stores of one step."""
        for req_id in finished:
            self.forget(req_id)
        for req_id in preempted:
            tracker = self._trackers.get(req_id)
            if tracker is not None and tracker.admitted:  # not one re-admitted in this very step
                self.forget(req_id)
        step = StepPlan()
        for req_id, tracker in self._trackers.items():
            if tracker.load_async and tracker.load > 0:  # admitted this step, waits for its KV
                step.loads.append(self._load(tracker, req_id, block_ids, is_async=True))
        c = self.chunk
        for req_id, scheduled in num_scheduled_tokens.items():
            tracker = self._trackers.get(req_id)
            if tracker is None:
                continue
            request = tracker.request
            before = int(request.num_computed_tokens)
            after = before + int(scheduled)
            if before < tracker.last_end:
                tracker.saved = min(tracker.saved, before - before % c)
            tracker.last_end = after
            blocks: list[int] | None = None
            if not tracker.admitted:
                tracker.admitted = True
                if tracker.load > 0:
                    load = self._load(tracker, req_id, block_ids, is_async=False)
                    blocks = load.block_ids
                    step.loads.append(load)
            prompt = int(request.num_prompt_tokens)
            limit = min(after, prompt)
            end = prompt if limit == prompt and self.save_partial else limit - limit % c
            if self.store and end > tracker.saved:
                blocks = blocks if blocks is not None else block_ids(req_id)
                if blocks is not None:
                    skip = tracker.saved - tracker.saved % c
                    step.saves.append(SaveReq(req_id, list(request.all_token_ids[:end]), skip, blocks))
                    tracker.saved = end
        return step
