"""kvtier as SGLang's HiCache L3 storage backend (``HiCacheStorage``, zero-copy v1 interface).

Tested on SGLang 0.5.23 (CPU, see docs/sglang.md). Enable it with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \
      '{"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang", "class_name": "KvtierStorage",
        "interface_v1": 1, "kvtier_config": "kvtier.yaml", "kvtier": {"disk": {"enabled": true}}}'

(:func:`kvtier.integrations.sglang.cli.backend_extra_config` builds it.) kvtier's own keys in that JSON
(all optional): ``kvtier_config`` (YAML file; default ``$KVTIER_CONFIG``), ``kvtier`` (a mapping of
config overrides), ``kvtier_model_id`` (the model part of every key; default SGLang's model name).
``KVTIER_*`` environment variables apply as everywhere else. At least one serialized tier (disk,
remote, redis or fs) must be enabled: SGLang's host pool already is the CPU tier.

Keys. SGLang never shows the backend tokens, only one key per page: a SHA-256 chain over the page's
tokens and every page before it (64 hex digits). Page ``h`` is stored as one kvtier object under
``BLAKE3(namespace_root || h)[:16]``, namespace = model + KV spec (layers, heads, head dim, dtype,
page tokens) + codec + tenant, with tensor/pipeline rank and size in the model part when either is >
1. Each page is a :class:`~kvtier.record.ChunkRecord` of kind ``PAGE`` whose *identity* is the raw
page hash (a BLAKE3 digest of it if longer than :data:`kvtier.wire.MAX_PAGE_IDENTITY`), checked on
every hit by :func:`kvtier.record.verify` like kvtier's token ids; together with the checksum (and
the MAC when ``auth.secret`` is set) a damaged frame or a key collision is a counted miss, never
foreign KV. No parent chaining of our own: SGLang's hash already
commits to the whole prefix, so the parent field is the namespace root. Keys are stable across
processes and machines (no ``hash()``, no seed), which is what lets a restarted server hit.

Layout. Each page is stored in kvtier's canonical layout ``[layers, 2, page_size, heads, head_dim]``,
whatever SGLang's host layout (``layer_first`` or ``page_first``), so the frames do not depend on
``--hicache-mem-layout``. MLA and hybrid (v2) pools are not supported: kvtier then stays off and SGLang
runs without L3.

Pages vs chunks. One object per page (``pages_per_chunk`` = 1 in effect): SGLang hands pages in
batches that start at radix-node boundaries, so a multi-page chunk would straddle calls and need
state across them; measured in docs/sglang.md, page objects of a real model (360 KiB for SmolLM2-135M
at 16 tokens, MiBs for 7B models) already run at the tiers' bulk rate.

Failure. Every backend call catches everything: an error is logged, counted in :attr:`counters` and
answered as a miss (``False`` / 0 pages); SGLang then recomputes. Writes are synchronous (the call
returns once the frames are in the tiers), on SGLang's own backup thread.

Cross-engine sharing with vLLM / HF: not through these keys. kvtier's token keys hash token ids in
``chunk_tokens`` chunks; SGLang hands the backend neither the tokens nor anything they could be
derived from, so its pages live in their own namespace. Sharing would need SGLang to pass token ids
(``--hicache-storage-key-scheme`` has no such option in 0.5.23); see docs/sglang.md.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from kvtier.config import KvtierConfig, load_config
from kvtier.errors import ConfigError, LayoutError
from kvtier.frame_auth import FrameKeys
from kvtier.integrations.common import config_overrides
from kvtier.integrations.sglang.pages import PageKeys, PoolView, copy_page, namespace_model
from kvtier.integrations.sglang.stats import IoStats
from kvtier.keys import Namespace
from kvtier.storage.factory import build_tiers
from kvtier.storage.manager import StorageManager

if TYPE_CHECKING:
    _Base = object
else:  # the base class only exists where SGLang is installed; the pure parts work without it
    try:
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base
    except ImportError:
        _Base = object

log = logging.getLogger(__name__)
__all__ = ["EXTRA_KEYS", "KvtierStorage"]

EXTRA_KEYS = ("kvtier_config", "kvtier", "kvtier_model_id")
_T = TypeVar("_T")


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


class KvtierStorage(_Base):
    """SGLang ``HiCacheStorage`` over kvtier's serialized tiers; SGLang's base class documents each
    method's contract, the module docstring this backend's behaviour."""

    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.config = _load_config(extra)
        model = str(extra.get("kvtier_model_id") or getattr(storage_config, "model_name", None) or "unknown")
        self.model_id = namespace_model(model, storage_config.tp_rank, storage_config.tp_size,
                                        storage_config.pp_rank, storage_config.pp_size)
        self.counters: Counter[str] = Counter()
        self.io = IoStats()
        self.keys: PageKeys | None = None
        self.view: PoolView | None = None
        self.manager: StorageManager | None = None
        self._staging: threading.local = threading.local()
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
        self.keys = PageKeys(Namespace(self.model_id, view.spec, "raw", self.config.tenant))
        self.manager = StorageManager(view.spec, build_tiers(self.config, view.spec),
                                      queue_depth=self.config.store_queue,
                                      auth=FrameKeys.from_config(self.config.auth))
        log.info("kvtier: SGLang pages of %d tokens, %s, namespace %s", view.page_size, view.spec.fingerprint(),
                 self.model_id)

    def _page_buffer(self) -> torch.Tensor:
        """This thread's contiguous canonical page (reads land here, verified, before the host pool)."""
        buf: torch.Tensor | None = getattr(self._staging, "page", None)
        if buf is None:
            assert self.view is not None
            buf = torch.empty(self.view.spec.chunk_shape(), dtype=self.view.spec.torch_dtype)
            self._staging.page = buf
        return buf

    # ---- lookups ----------------------------------------------------------------------------------
    def _present(self, keys: Sequence[str]) -> list[int]:
        """Tier index of each page in the leading run of ``keys`` that some tier holds."""
        if self.manager is None or self.keys is None or not keys:
            return []
        return self.manager.locate([self.keys.key(h) for h in keys])

    @_guarded(lambda *_a: 0)
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        found = len(self._present(keys))
        self.counters["exists_pages"] += len(keys)
        self.counters["exists_hits"] += found
        return found

    @_guarded(lambda *_a: False)
    def exists(self, key: str) -> bool:
        return len(self._present([key])) == 1

    # ---- reads ------------------------------------------------------------------------------------
    def _read(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        """Load the leading run of ``keys`` into canonical ``targets``; stop at the first miss."""
        out = [False] * len(keys)
        if self.manager is None or self.keys is None:
            return out
        staging = self._page_buffer()
        start = time.perf_counter()
        for i, tier in enumerate(self._present(keys)):
            if not self.manager.load(tier, self.keys.record(keys[i]), staging):
                self.counters["read_failures"] += 1
                break
            copy_page(targets[i], staging)
            out[i] = True
        hits = sum(out)
        self.io.record("prefetch", hits, hits * self.manager.spec.chunk_bytes, time.perf_counter() - start)
        self.counters["read_pages"] += hits
        self.counters["read_misses"] += len(keys) - hits
        return out

    @_guarded(_no_pages)
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        if self.view is None:
            return [False] * len(keys)
        view = self.view
        return self._read(keys, [view.page(i) for i in view.page_starts(host_indices, len(keys))])

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
        ok = self._read(keys, [view.from_flat(f) for f in flats])
        return [f if hit else None for f, hit in zip(flats, ok)]

    # ---- writes -----------------------------------------------------------------------------------
    def _write(self, keys: Sequence[str], sources: Sequence[torch.Tensor]) -> list[bool]:
        """Store each canonical page of ``sources`` under its key; return once the tiers have them."""
        if self.manager is None or self.keys is None or self.view is None:
            return [False] * len(keys)
        manager, spec = self.manager, self.view.spec
        out: list[bool] = []
        before = self._write_failures()
        began = time.perf_counter()
        for start in range(0, len(keys), self.config.store_queue):  # never overfill the write queue
            for h, src in zip(keys[start : start + self.config.store_queue],
                              sources[start : start + self.config.store_queue]):
                page = torch.empty(spec.chunk_shape(), dtype=spec.torch_dtype)
                copy_page(page, src)  # own copy: SGLang may reuse the host slots once this call returns
                out.append(manager.write_back(self.keys.record(h), page, _noop))
            manager.flush()
        failed = self._write_failures() - before
        if failed == 0:
            self.io.record("backup", sum(out), sum(out) * spec.chunk_bytes, time.perf_counter() - began)
        self.counters["write_pages"] += sum(out)
        self.counters["write_failures"] += failed + out.count(False)
        return out if failed == 0 else [False] * len(keys)

    def _write_failures(self) -> int:
        assert self.manager is not None
        return sum(slot.counters["writes_failed"] + slot.counters["writes_skipped_unhealthy"]
                   for slot in self.manager.slots)

    @_guarded(_no_pages)
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        if self.view is None:
            return [False] * len(keys)
        view = self.view
        return self._write(keys, [view.page(i) for i in view.page_starts(host_indices, len(keys))])

    @_guarded(lambda *_a: False)
    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    @_guarded(lambda *_a: False)
    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if self.view is None or values is None:
            return False
        view = self.view
        return all(self._write(keys, [view.from_flat(v.reshape(-1)) for v in values]))

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
        if self.manager is not None:
            self.manager.close()
            self.manager = None


def _noop() -> None:
    return None
