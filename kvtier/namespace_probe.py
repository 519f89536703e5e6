"""Make a namespace mismatch between engines sharing a tier visible instead of a silent miss.

Chunk keys hash the namespace (model id, KV spec incl. dtype and ``chunk_tokens``, codec, tenant), so
two engines that disagree on any of these never find each other's chunks, and nothing in the keys
says why. The probe closes that gap:

- When an engine stores the first chunk of a prompt it also writes a tiny *marker* frame to its lower
  tiers, keyed by the prompt's first :data:`PROBE_TOKENS` token ids only (no namespace), holding its
  namespace description (``codec_params["namespace"]``) and no KV.
- When a lookup misses from the first token and the prompt has at least :data:`PROBE_TOKENS` tokens,
  the engine reads that marker; a verified marker of another namespace is a *namespace miss*: counted
  (``namespace_misses``) and logged once per foreign namespace, naming the fields that differ.

Invariants: a marker is a valid wire frame (disk index rebuilds and checksums treat it like any chunk)
whose key can never equal a chunk key of real KV except by a 128-bit hash collision, and a marker is
never decoded into KV. Probe failures (tier down, damaged marker) are ignored: the probe is advisory and
never changes what a lookup returns. Marker writes go through one bounded queue on a daemon thread
(dropped and counted when full), so ``store`` never waits for them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict

import numpy as np
import xxhash

from kvtier import wire
from kvtier.errors import KvtierError
from kvtier.keys import ChunkKey, Namespace
from kvtier.queues import wait_done
from kvtier.record import ChunkRecord, Kind
from kvtier.storage.manager import StorageManager

log = logging.getLogger(__name__)

PROBE_TOKENS = 256  # token ids a marker is keyed by (shorter prompts are not probed; independent of chunk_tokens)
_TAG = b"kvtier/ns-probe\x1f"
_SEEN = 4096  # probe keys remembered per engine (markers written / answers known)
_QUEUE = 64


def describe(namespace: Namespace) -> dict[str, str]:
    """The fields of ``namespace`` as plain strings (what a marker carries)."""
    return {"model": namespace.model, "spec": namespace.spec.fingerprint(), "codec": namespace.codec,
            "tenant": namespace.tenant}


def probe_key(tokens: np.ndarray) -> ChunkKey:
    """Marker key of a prompt: a hash of its first :data:`PROBE_TOKENS` uint32-le token ids."""
    return xxhash.xxh3_128_digest(_TAG + tokens[:PROBE_TOKENS].tobytes())


class NamespaceProbe:
    """Writes and checks namespace markers for one engine (see the module docstring)."""

    def __init__(self, namespace: Namespace, storage: StorageManager) -> None:
        self.namespace = namespace
        self.storage = storage
        self.description = describe(namespace)
        self.root = namespace.root()
        self.counters: dict[str, int] = {"namespace_misses": 0, "namespace_markers": 0,
                                         "namespace_markers_dropped": 0}
        self._written: OrderedDict[ChunkKey, None] = OrderedDict()
        self._warned: set[tuple[tuple[str, str], ...]] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[ChunkKey, np.ndarray]] = queue.Queue(maxsize=_QUEUE)
        self._writer: threading.Thread | None = None  # started by the first marker
        log.info("kvtier namespace %s: model=%r spec=%s codec=%s tenant=%r", self.root.hex()[:16],
                 namespace.model, self.description["spec"], namespace.codec, namespace.tenant)

    def _remember(self, key: ChunkKey) -> bool:
        """True the first time ``key`` is seen (LRU of :data:`_SEEN` keys)."""
        with self._lock:
            if key in self._written:
                self._written.move_to_end(key)
                return False
            self._written[key] = None
            if len(self._written) > _SEEN:
                self._written.popitem(last=False)
            return True

    def on_store(self, tokens: np.ndarray) -> None:
        """The first chunk of ``tokens`` was stored: queue its marker (once per prompt prefix)."""
        if len(tokens) < PROBE_TOKENS or not self.storage.enabled:
            return
        key = probe_key(tokens)
        if not self._remember(key):
            return
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name="kvtier-ns-probe", daemon=True)
                self._writer.start()
        try:
            self._queue.put_nowait((key, np.array(tokens[:PROBE_TOKENS], dtype="<u4")))
        except queue.Full:
            self.counters["namespace_markers_dropped"] += 1

    def _marker(self, key: ChunkKey, tokens: np.ndarray) -> list[bytes | memoryview]:
        """A KV-less frame (signed when the engine has a keyring) carrying this namespace."""
        record = ChunkRecord(key, self.root, tokens[:PROBE_TOKENS].tobytes(), Kind.TOKENS, PROBE_TOKENS)
        head = wire.frame_head(record, self.namespace.spec, "raw", {"namespace": self.description}, b"",
                               self.storage.auth)
        return [head, b""]

    def _drain(self) -> None:
        while True:
            key, tokens = self._queue.get()
            try:
                parts = self._marker(key, tokens)
                for slot in self.storage.slots:
                    if getattr(slot.tier, "read_only", False) or not slot.usable(time.monotonic()):
                        continue
                    try:
                        slot.tier.put_parts(key, parts)
                        self.counters["namespace_markers"] += 1
                    except Exception:  # advisory: a tier that cannot take the marker is not an error
                        log.debug("namespace marker write to %s failed", slot.tier.name, exc_info=True)
            except Exception:
                log.debug("namespace marker failed", exc_info=True)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until queued markers are written; False on timeout."""
        return wait_done(self._queue, timeout_s)

    def on_miss(self, tokens: np.ndarray) -> bool:
        """A lookup of ``tokens`` hit nothing: True (and counted, logged) when a lower tier holds a
        marker for the same first tokens from another namespace."""
        if len(tokens) < PROBE_TOKENS or not self.storage.enabled:
            return False
        key = probe_key(tokens)
        now = time.monotonic()
        for slot in self.storage.slots:
            if getattr(slot.tier, "read_only", False) or not slot.usable(now):
                continue  # markers are only written to (and read from) writable tiers
            try:
                frame = slot.tier.get(key)
                if frame is None:
                    continue
                meta, _payload = wire.unpack_meta(frame, self.storage.auth)
            except (KvtierError, OSError):
                continue
            if meta.key != key or meta.identity != tokens[:PROBE_TOKENS].tobytes() or meta.parent == self.root:
                continue
            foreign = meta.codec_params.get("namespace")
            if not isinstance(foreign, dict):
                continue
            self._report(slot.tier.name, {str(k): str(v) for k, v in foreign.items()})
            return True
        return False

    def _report(self, tier: str, foreign: dict[str, str]) -> None:
        with self._lock:
            self.counters["namespace_misses"] += 1
            ident = tuple(sorted(foreign.items()))
            first = ident not in self._warned
            self._warned.add(ident)
        if first:
            diff = {k: (foreign.get(k), v) for k, v in self.description.items() if foreign.get(k) != v}
            log.warning("kvtier namespace miss: tier %s holds this prompt's KV under another namespace; "
                        "differing (theirs, ours): %s. Engines share KV only when model id, KV spec "
                        "(layers, heads, head dim, dtype, chunk_tokens), codec and tenant all match.", tier, diff)
