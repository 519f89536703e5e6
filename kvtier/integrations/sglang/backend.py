"""kvtier as SGLang's HiCache L3 storage backend (``HiCacheStorage``, zero-copy v1 interface).

Tested on SGLang 0.5.23 (CPU, see docs/sglang.md). Enable it with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \
      '{"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang", "class_name": "KvtierStorage",
        "interface_v1": 1, "hicache_storage_pass_prefix_keys": true,
        "kvtier_config": "kvtier.yaml", "kvtier": {"disk": {"enabled": true}}}'

(:func:`kvtier.integrations.sglang.cli.backend_extra_config` builds it.) kvtier's own keys in that JSON
(all optional): ``kvtier_config`` (YAML file; default ``$KVTIER_CONFIG``), ``kvtier`` (a mapping of
config overrides), ``kvtier_model_id`` (the model part of every key; default SGLang's model name),
``kvtier_pages_per_object`` (pages per stored object, 1..128, default ``"auto"``: the largest power of
two that keeps an object within 16 MiB). ``KVTIER_*`` environment variables apply as everywhere else.
At least one serialized tier (disk, remote, redis or fs) must be enabled: SGLang's host pool already
is the CPU tier.

Keys. SGLang never shows the backend tokens, only one key per page: a SHA-256 chain over the page's
tokens and every page before it. Namespace = model + KV spec (layers, heads, head dim, dtype, page
tokens) + codec + tenant, with tensor/pipeline rank and size in the model part when either is > 1.

Objects of several pages. With ``hicache_storage_pass_prefix_keys`` SGLang passes every call the page
hashes before its keys, so each page has an absolute position. Pages are grouped at fixed positions
(group ``g`` = pages ``[g*G, (g+1)*G)``, :func:`~kvtier.integrations.sglang.pages.spans`), one object
per group, keyed by its last page hash and page count (:class:`~kvtier.integrations.sglang.pages.PageKeys`):

- a prompt's tail is a short object of the pages it has, so nothing is dropped;
- a call that starts inside a group (a radix node that begins mid-group) first reads the group's
  earlier pages back from the tiers and writes the whole group;
- a reader probes, per group, the longest object its own hashes name, then shorter ones, then the
  :class:`~kvtier.integrations.sglang.pages.PageIndex` of objects this process wrote or read (an object
  holding the reader's page whose later pages differ: a prompt that shares only part of a group);
- every object carries the ids of all its pages and a hit uses only its leading pages equal to the
  reader's (after :func:`kvtier.record.verify` of the whole record with checksum and MAC): a damaged
  frame, a collision or a page of another prompt is a counted miss, never foreign KV.

SGLang passes no prefix keys for a call at the start of a sequence (nor for any call with the flag off,
or on its legacy non-v1 path): such a call starts at position 0, so without the flag groups are relative
to each call and a prefix reached through other radix boundaries misses (never wrong KV). Keys are
stable across processes and machines (no ``hash()``, no seed), which is what lets a restarted server
hit; the page index is per process (after a restart, a prompt that diverges inside a group recomputes
that group's shared pages).

Layout. Objects are stored in kvtier's canonical layout ``[layers, 2, pages * page_size, heads,
head_dim]``, whatever SGLang's host layout (``layer_first``, ``page_first`` or ``page_first_direct``),
so the frames do not depend on ``--hicache-mem-layout``. A write sends each object's pages straight
from the pool (frame head computed over the pool's runs, head + runs handed to the tiers, ``writev``
for the disk tier) where the layout keeps a run's layer and K/V in one block and every tier stores raw
frames, and otherwise gathers them into the buffer its frame is checksummed and written from. A read
from a tier that reads raw payloads into several buffers (disk and fs ``preadv``, the cache server
``recvmsg_into``) puts each object's payload straight into the caller's pool pages (verified there:
see :meth:`KvtierStorage._read_into` for why that is safe in SGLang); otherwise it scatters each
verified object from the buffer the tier read it into. Pages that sit next to
each other in the host pool move as one run (:class:`~kvtier.integrations.sglang.pages.HostPages`):
one ``writev`` buffer per layer and K/V, or one single-threaded strided copy, not one per page. MLA
and hybrid (v2) pools are not supported: kvtier then stays off and SGLang runs without L3.

Failure. Every backend call catches everything: an error is logged, counted in :attr:`counters` and
answered as a miss (``False`` / 0 pages); SGLang then recomputes. Writes are synchronous (the call
returns once the frames are in the tiers, so SGLang may reuse the pages), on SGLang's own backup thread
and, for objects written straight from the pool, the put threads of this backend (:data:`PUT_THREADS`).

Cross-engine sharing with vLLM / HF: not through these keys. kvtier's token keys hash token ids in
``chunk_tokens`` chunks; SGLang hands the backend neither the tokens nor anything they could be
derived from, so its pages live in their own namespace. Sharing would need SGLang to pass token ids
(``--hicache-storage-key-scheme`` has no such option in 0.5.23); see docs/sglang.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from kvtier import wire
from kvtier.config import KvtierConfig, load_config
from kvtier.errors import ConfigError, LayoutError
from kvtier.frame_auth import FrameKeys
from kvtier.integrations.common import config_overrides
from kvtier.integrations.sglang.pages import (
    MAX_PAGES_PER_OBJECT,
    HostPages,
    PageIndex,
    PageKeys,
    PageList,
    Pages,
    PoolView,
    Span,
    auto_pages_per_object,
    matching_pages,
    namespace_model,
    object_pages,
    object_slabs,
    pages_of,
    spans,
)
from kvtier.integrations.sglang.stats import IoStats
from kvtier.keys import Namespace
from kvtier.record import ChunkRecord
from kvtier.storage.factory import build_tiers
from kvtier.storage.manager import Load, StorageManager

if TYPE_CHECKING:
    _Base = object
else:  # the base class only exists where SGLang is installed; the pure parts work without it
    try:
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base
    except ImportError:
        _Base = object

log = logging.getLogger(__name__)
__all__ = ["EXTRA_KEYS", "KvtierStorage"]

EXTRA_KEYS = ("kvtier_config", "kvtier", "kvtier_model_id", "kvtier_pages_per_object")
_T = TypeVar("_T")
READ_BATCH_PAGES = 8  # pages per read batch of the storage manager
FLUSH_TIMEOUT_S = 30.0  # a write call waits this long for its objects (as the manager's flush)
# objects written at once by a write call (their file writes / fsyncs overlap): a 128-page batch of 32-page
# objects all at once; with fsync faster than 2, neutral without (docs/sglang.md, "Object size")
PUT_THREADS = 4


# ---- the backend ----------------------------------------------------------------------------------
def _guarded(default: Callable[..., _T]) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Never let a backend call raise into SGLang: log, count, return ``default(*args)`` (a miss)."""

    def wrap(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def call(self: KvtierStorage, *args: Any, **kwargs: Any) -> _T:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                log.exception("kvtier %s failed; answering as a miss", method.__name__)
                self.counters[f"{method.__name__}_errors"] += 1
                return default(*args)

        return call

    return wrap


def _no_pages(keys: Sequence[str], *_rest: Any) -> list[bool]:
    return [False] * len(keys)


def _none(*_args: Any) -> Any:
    return None


def _load_config(extra: dict[str, Any]) -> KvtierConfig:
    overrides = config_overrides(extra, EXTRA_KEYS, "hicache-storage-backend-extra-config")
    config = load_config(extra.get("kvtier_config"), overrides=overrides)
    if not any(getattr(config, s).enabled for s in ("disk", "remote", "redis", "fs")):
        raise ConfigError("kvtier as SGLang's HiCache storage needs a serialized tier: enable one of "
                          "disk, remote, redis or fs (SGLang's host pool already is the CPU tier)")
    return config


def _pages_per_object(extra: dict[str, Any]) -> int | None:
    """``kvtier_pages_per_object`` from the extra config; ``None`` = auto (decided once the page size is known)."""
    value = extra.get("kvtier_pages_per_object", "auto")
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGES_PER_OBJECT:
        raise ConfigError(f"kvtier_pages_per_object must be 'auto' or 1..{MAX_PAGES_PER_OBJECT}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Hit:
    """A stored object that holds pages ``[span.first, end)`` of the caller's chain (``end <= span.end``)."""

    span: Span
    tier: int
    record: ChunkRecord
    end: int


class KvtierStorage(_Base):
    """SGLang ``HiCacheStorage`` over kvtier's serialized tiers; SGLang's base class documents each
    method's contract, the module docstring this backend's behaviour."""

    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.config = _load_config(extra)
        self._group = _pages_per_object(extra)
        model = str(extra.get("kvtier_model_id") or getattr(storage_config, "model_name", None) or "unknown")
        self.model_id = namespace_model(model, storage_config.tp_rank, storage_config.tp_size,
                                        storage_config.pp_rank, storage_config.pp_size)
        self.counters: Counter[str] = Counter()
        self.io = IoStats()
        self.index = PageIndex()
        self.keys: PageKeys | None = None
        self.view: PoolView | None = None
        self.manager: StorageManager | None = None
        self._direct = False  # every writable tier stores raw frames: objects go down straight from the pool
        self._putter: futures.ThreadPoolExecutor | None = None  # the thread those objects are written on
        self._buffers = threading.local()
        if getattr(storage_config, "is_mla_model", False):
            log.error("kvtier: MLA models are not supported by the SGLang adapter; L3 stays empty")

    # ---- setup ------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host
        if getattr(self.storage_config, "is_mla_model", False) or self.manager is not None:
            return
        try:
            view = PoolView(mem_pool_host)
        except (LayoutError, AttributeError) as exc:
            log.error("kvtier: SGLang's host pool is not usable (%s); L3 stays empty", exc)
            return
        self.view = view
        if self._group is None:
            self._group = auto_pages_per_object(view.spec.chunk_bytes)
        self.keys = PageKeys(Namespace(self.model_id, view.spec, "raw", self.config.tenant))
        # read batches of about 8 pages whatever the object size, so copying out overlaps the next reads
        self.manager = StorageManager(view.spec, build_tiers(self.config, view.spec),
                                      queue_depth=self.config.store_queue,
                                      auth=FrameKeys.from_config(self.config.auth),
                                      read_batch=max(1, READ_BATCH_PAGES // self._group))
        self._direct = all(slot.codec == "raw" for slot in self.manager.slots
                           if not getattr(slot.tier, "read_only", False))
        self._putter = futures.ThreadPoolExecutor(max_workers=PUT_THREADS, thread_name_prefix="kvtier-sglang-put")
        log.info("kvtier: SGLang pages of %d tokens, %d pages per object, %s, namespace %s", view.page_size,
                 self._group, view.spec.fingerprint(), self.model_id)

    @property
    def pages_per_object(self) -> int:
        """Pages per stored object (known once the host pool is registered)."""
        return self._group or 1

    def _chain(self, keys: Sequence[str], extra_info: Any) -> tuple[list[str], int, int]:
        """(the page hashes from the sequence start, position of ``keys[0]`` in them, group size).

        SGLang passes no prefix keys (``None``) for a call at the start of a sequence, and for every
        call when ``hicache_storage_pass_prefix_keys`` is off; either way the call is taken to start at
        position 0 (without the flag, groups are relative to each call)."""
        prefix = getattr(extra_info, "prefix_keys", None) or []
        return [*prefix, *keys], len(prefix), self.pages_per_object

    # ---- finding objects --------------------------------------------------------------------------
    def _plan(self, chain: Sequence[str], todo: Sequence[Span], group: int) -> list[_Hit]:
        """Stored objects holding the leading run of ``todo``'s pages (see the module docstring)."""
        assert self.manager is not None and self.keys is not None
        hits: list[_Hit] = []
        i = 0
        while i < len(todo):
            longest = [self.keys.record(chain[s.start : min(s.start + group, len(chain))]) for s in todo[i:]]
            found = self.manager.locate([r.key for r in longest])
            hits += [_Hit(s, t, r, s.end) for s, t, r in zip(todo[i:], found, longest)]
            i += len(found)
            if i == len(todo):
                break
            hit = self._fallback(chain, todo[i])
            if hit is None:
                break
            hits.append(hit)
            if hit.end < hit.span.end:
                break
            i += 1
        return hits

    def _fallback(self, chain: Sequence[str], span: Span) -> _Hit | None:
        """An object holding page ``span.first`` when the group's longest object is missing: a shorter
        one the chain names, else one from the page index."""
        assert self.manager is not None and self.keys is not None
        top = min(span.start + self.pages_per_object, len(chain))
        ends = range(top - 1, span.first, -1)
        shorter = [self.keys.record(chain[span.start : end]) for end in ends]
        for end, record, tier in zip(ends, shorter, self.manager.where([r.key for r in shorter])):  # longest first
            if tier is not None:
                return _Hit(span, tier, record, min(end, span.end))
        indexed = self.index.find(self.keys.page_id(chain[span.first]))
        if indexed is None or indexed[1] != span.first - span.start:
            return None
        record = indexed[0]
        ids = [self.keys.page_id(h) for h in chain[span.start : span.end]]
        usable = matching_pages(record, ids, span.first - span.start)
        found = self.manager.locate([record.key])
        if not found or usable == 0:
            return None
        self.counters["index_hits"] += 1
        return _Hit(span, found[0], record, span.first + usable)

    def _load(self, chain: Sequence[str], first: int, count: int, group: int, target: Pages) -> int:
        """Load pages ``[first, first + count)`` of ``chain`` into ``target`` (its page ``i`` is page
        ``first + i`` of the chain); return how many leading pages arrived verified."""
        if self.manager is None or self.keys is None or self.view is None:
            return 0
        spec, page = self.view.spec, self.view.page_size
        hits = self._plan(chain, spans(first, count, group), group)
        numel = [pages_of(h.record) * page * spec.bytes_per_token // spec.itemsize for h in hits]
        flat = self._staging("read", sum(numel))
        loads, offset = [], 0
        for hit, n in zip(hits, numel):
            out = flat[offset : offset + n].view(spec.chunk_shape(hit.record.num_tokens))
            loads.append(Load(hit.tier, hit.record, out, self._read_into(hit, object_pages(out, page), target, first)))
            offset += n
        done = first
        with contextlib.closing(self.manager.load_many(loads)) as results:
            for hit, load, ok in zip(hits, loads, results):
                if not ok:
                    self.counters["read_failures"] += 1
                    break
                self.index.add(hit.record)
                if load.into is None:
                    target.scatter(object_pages(load.out, page), hit.span.first - hit.span.start,
                                   hit.span.first - first, hit.end - hit.span.first)
                done = hit.end
        return done - first

    def _read_into(self, hit: _Hit, obj: np.ndarray, target: Pages, first: int) -> list[memoryview] | None:
        """Where ``hit``'s payload can be read straight to: the caller's pool pages for the pages it asked
        for, ``obj`` (the object's staging view) for the object's other pages. Only into SGLang's host
        pool (``batch_get_v1``) from a tier that reads raw payloads into several buffers (disk, fs, the
        cache server: :attr:`~kvtier.storage.manager.TierSlot.reads_scattered`), and only where the
        layout keeps a run's layer and K/V in one block; ``None`` otherwise (read into ``obj``, then scatter).

        Writing into the pool before the object is verified is harmless because SGLang allocates those
        host slots for this prefetch alone and uses only the leading pages answered True: the rest,
        where a failed object's bytes may have landed, is freed unread (SGLang 0.5.23:
        ``hybrid_cache_controller.py`` ``allocate_storage_hit`` allocates them;
        ``cache_controller.py`` ``_page_get_zero_copy`` stops at the first False;
        ``unified_radix_cache.py`` ~2368 releases ``host_indices[completed_tokens:]`` and
        ``_handle_prefetch_result`` inserts only ``host_indices[:completed_tokens]``)."""
        assert self.manager is not None
        slot = self.manager.slots[hit.tier]
        if not isinstance(target, HostPages) or not slot.reads_scattered:
            return None
        start, end, total = hit.span.first - hit.span.start, hit.end - hit.span.start, obj.shape[2]
        runs = [run for _offset, run in target.runs(hit.span.first - first, hit.end - hit.span.first)]
        return object_slabs(([obj[:, :, :start]] if start else []) + runs + ([obj[:, :, end:]] if end < total else []))

    # ---- lookups ----------------------------------------------------------------------------------
    @_guarded(lambda *_a: 0)
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        if self.manager is None or not keys:
            return 0
        chain, first, group = self._chain(keys, extra_info)
        hits = self._plan(chain, spans(first, len(keys), group), group)
        found = (hits[-1].end - first) if hits else 0
        self.counters["exists_pages"] += len(keys)
        self.counters["exists_hits"] += found
        return found

    @_guarded(lambda *_a: False)
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---- reads ------------------------------------------------------------------------------------
    def _read(self, keys: Sequence[str], extra_info: Any, targets: Pages) -> list[bool]:
        """Load the leading run of ``keys`` into ``targets``; stop at the first miss."""
        if self.manager is None or not keys:
            return [False] * len(keys)
        chain, first, group = self._chain(keys, extra_info)
        start = time.perf_counter()
        hits = self._load(chain, first, len(keys), group, targets)
        self.io.record("prefetch", hits, hits * self.manager.spec.chunk_bytes, time.perf_counter() - start)
        self.counters["read_pages"] += hits
        self.counters["read_misses"] += len(keys) - hits
        return [i < hits for i in range(len(keys))]

    def _host_pages(self, keys: Sequence[str], host_indices: torch.Tensor) -> HostPages | None:
        """The host pool pages SGLang's v1 calls name (``None`` before registration)."""
        view = self.view
        if view is None:
            return None
        return HostPages(view, view.page_starts(host_indices, len(keys)))

    @_guarded(_no_pages)
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        pages = self._host_pages(keys, host_indices)
        return [False] * len(keys) if pages is None else self._read(keys, extra_info, pages)

    @_guarded(_none)
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        found = self.batch_get([key], [target_location] if target_location is not None else None)
        return found[0] if found else None

    @_guarded(lambda keys, *_a: [None] * len(keys))
    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        if self.view is None:
            return [None] * len(keys)
        view = self.view
        flats = list(target_locations) if target_locations is not None else [
            torch.empty(view.spec.chunk_bytes // view.spec.itemsize, dtype=view.spec.torch_dtype) for _ in keys]
        ok = self._read(keys, None, PageList.of_tensors([view.from_flat(f) for f in flats]))
        return [f if hit else None for f, hit in zip(flats, ok)]

    # ---- writes -----------------------------------------------------------------------------------
    def _write(self, keys: Sequence[str], extra_info: Any, sources: Pages) -> list[bool]:
        """Store pages ``sources`` of ``keys``, one object per group, each written straight from the
        pages' memory (:meth:`_put_direct`) or, where that does not apply, gathered into the buffer its
        frame is sealed and written from; return once the tiers have them (True per page stored)."""
        if self.manager is None or self.keys is None or self.view is None or not keys:
            return [False] * len(keys)
        manager, spec, page = self.manager, self.view.spec, self.view.page_size
        chain, first, group = self._chain(keys, extra_info)
        out = [False] * len(keys)
        written: list[ChunkRecord] = []
        before = self._write_failures()
        began = time.perf_counter()
        todo = spans(first, len(keys), group)
        puts: dict[futures.Future[int], tuple[Span, ChunkRecord]] = {}  # objects written straight from the pool
        # own copy (SGLang may reuse the host slots once this call returns), in this thread's buffer
        page_numel = page * spec.bytes_per_token // spec.itemsize
        flat = self._staging("write", sum(s.end - s.start for s in todo) * page_numel)
        offset = 0
        for n, span in enumerate(todo):
            numel = (span.end - span.start) * page_numel
            obj = flat[offset : offset + numel].view(spec.chunk_shape((span.end - span.start) * page))
            offset += numel
            obj_pages = object_pages(obj, page)
            head = span.first - span.start
            if head and self._load(chain, span.start, head, group, PageList.of_object(obj_pages)) < head:
                self.counters["write_unmerged_pages"] += span.end - span.first  # group head not stored
                continue
            record = self.keys.record(chain[span.start : span.end])
            put = self._put_direct(record, obj_pages[:, :, :head], sources, span.first - first, span.end - span.first)
            if put is not None:
                puts[put] = (span, record)
            else:
                sources.gather(obj_pages, head, span.first - first, span.end - span.first)
                if manager.write_back(record, obj, _noop):
                    written.append(record)
                    out[span.first - first : span.end - first] = [True] * (span.end - span.first)
            if (n + 1) % self.config.store_queue == 0:  # never overfill the write queue
                self._flush()
        self._flush()
        done, late = futures.wait(puts, timeout=FLUSH_TIMEOUT_S)
        if late:  # those objects count as not stored, and their head pages' buffer is given up
            self.counters["write_flush_timeouts"] += 1
            self._buffers.write = None
        for put in done:
            span, record = puts[put]
            if put.exception() is None and put.result() == 0:  # every tier took it
                written.append(record)
                out[span.first - first : span.end - first] = [True] * (span.end - span.first)
        failed = self._write_failures() - before
        stored = sum(out)
        if failed == 0:
            self.io.record("backup", stored, stored * spec.chunk_bytes, time.perf_counter() - began)
            for record in written:
                self.index.add(record)
        self.counters["write_pages"] += stored if failed == 0 else 0
        self.counters["write_objects"] += len(written) if failed == 0 else 0
        self.counters["write_failures"] += failed + out.count(False)
        return out if failed == 0 else [False] * len(keys)

    def _put_direct(self, record: ChunkRecord, head: np.ndarray, sources: Pages, first: int,
                    count: int) -> futures.Future[int] | None:
        """Write the object ``head`` (its leading pages, read back from the tiers) + ``sources``' pages
        ``[first, first + count)`` straight from their memory: the frame head (checksum, and MAC) is
        computed here over the runs, then the put thread hands head + runs to every tier
        (:meth:`StorageManager.put_frame`, one ``writev`` for the disk tier) while this thread goes on
        with the next object. The same frame as write-back's, without the copy into a canonical buffer.
        The caller waits for the returned future before SGLang may reuse the pages (its result: tiers
        that did not take the object, counted by the manager as for write-back). ``None``, having
        written nothing, where this does not apply (a tier with another codec, a host layout whose runs
        are not whole blocks per layer and K/V)."""
        assert self.manager is not None and self.view is not None and self._putter is not None
        manager = self.manager
        if not self._direct:
            return None
        runs = ([head] if head.shape[2] else []) + [run for _offset, run in sources.runs(first, count)]
        slabs = object_slabs(runs)
        if slabs is None:
            return None
        frame_head = wire.frame_head(record, self.view.spec, "raw", {}, slabs, manager.auth)
        return self._putter.submit(manager.put_frame, record.key, [frame_head, *slabs])

    def _staging(self, use: str, numel: int) -> torch.Tensor:
        """This thread's flat buffer for ``use`` ("read" or "write") of ``numel`` elements, reused across
        calls (a fresh one per call costs a page fault per 4 KiB)."""
        assert self.view is not None
        buf: torch.Tensor | None = getattr(self._buffers, use, None)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.view.spec.torch_dtype)
            setattr(self._buffers, use, buf)
        return buf[:numel]

    def _flush(self) -> None:
        """Wait for the queued writes; if they are still running when the wait gives up, this thread's
        write buffer is given up too (a late writer must never see the next call's pages)."""
        assert self.manager is not None
        if not self.manager.flush():
            self.counters["write_flush_timeouts"] += 1
            self._buffers.write = None

    def _write_failures(self) -> int:
        assert self.manager is not None
        return sum(slot.counters["writes_failed"] + slot.counters["writes_skipped_unhealthy"]
                   for slot in self.manager.slots)

    @_guarded(_no_pages)
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        pages = self._host_pages(keys, host_indices)
        return [False] * len(keys) if pages is None else self._write(keys, extra_info, pages)

    @_guarded(lambda *_a: False)
    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    @_guarded(lambda *_a: False)
    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if self.view is None or values is None:
            return False
        view = self.view
        return all(self._write(keys, None, PageList.of_tensors([view.from_flat(v.reshape(-1)) for v in values])))

    # ---- management -------------------------------------------------------------------------------
    @_guarded(_none)
    def clear(self) -> None:
        if self.manager is not None:
            self.manager.clear()

    def get_stats(self) -> Any:
        """Pages and GB/s of every read and write since the last call, as SGLang's ``StorageMetrics``
        (see :mod:`kvtier.integrations.sglang.stats`); kvtier's own counters are in :meth:`stats`."""
        return self.io.drain()

    def stats(self) -> dict[str, Any]:
        """This backend's counters and the tiers' (as ``CacheEngine.stats()`` reports them)."""
        return {"sglang": dict(self.counters), **(self.manager.stats() if self.manager else {})}

    @_guarded(_none)
    def close(self) -> None:
        if self._putter is not None:
            self._putter.shutdown(wait=True)
            self._putter = None
        if self.manager is not None:
            self.manager.close()
            self.manager = None


def _noop() -> None:
    return None
