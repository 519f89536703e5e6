"""The router's own record of which prompt prefixes it sent where: the fallback when the controller
cannot be asked.

Prompts are cut into whole chunks of ``chunk_tokens`` tokens (:func:`table_chunk_tokens`: the engines'
chunk size, so that a prefix the router credits a backend with is one the engine can hit) keyed by the
same hash chain as kvtier's
chunk keys (:func:`kvtier.cluster.index.chain_keys`, from a root of the router's own: these keys are
never compared with an engine's). A trailing partial chunk is not recorded.

Invariants:
- At most ``max_keys`` chunk keys are kept; the least recently recorded or matched key goes first.
- :meth:`PrefixTable.match` reports for a backend the tokens of the longest run of leading chunks every
  one of which was recorded for that backend, so a hit is always a prefix the router really sent there
  (the engine may have evicted it since: the table can over-report, the controller cannot).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import blake3
import numpy as np

from kvtier.cluster.index import chain_keys
from kvtier.config import MIN_DEFAULT_CHUNK

if TYPE_CHECKING:
    from kvtier.config import KvtierConfig

_ROOT = blake3.blake3(b"kvtier-router/v1").digest(length=16)


def table_chunk_tokens(config: KvtierConfig) -> int:
    """The prefix table's chunk size: the root ``chunk_tokens`` when ``config`` sets it (file, env or
    override: engines reading the same file use it too), else :data:`kvtier.config.MIN_DEFAULT_CHUNK`,
    what a vLLM connector with no ``chunk_tokens`` configured uses."""
    return config.chunk_tokens if "chunk_tokens" in config.model_fields_set else MIN_DEFAULT_CHUNK


class PrefixTable:
    def __init__(self, chunk_tokens: int = MIN_DEFAULT_CHUNK, max_keys: int = 1 << 18) -> None:
        if chunk_tokens <= 0 or max_keys <= 0:
            raise ValueError("chunk_tokens and max_keys must be positive")
        self.chunk_tokens = chunk_tokens
        self.max_keys = max_keys
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        """Chunk keys of the whole chunks of ``tokens``."""
        arr = np.asarray(tokens, dtype="<u4")
        return [key for _end, key in chain_keys(_ROOT, arr, self.chunk_tokens, partial=False)]

    def record(self, keys: Iterable[bytes], backend: str) -> None:
        """Remember that ``backend`` was sent a prompt whose leading chunks are ``keys``."""
        for key in keys:
            holders = self._holders.get(key)
            if holders is None:
                holders = self._holders[key] = set()
            else:
                self._holders.move_to_end(key)
            holders.add(backend)
        while len(self._holders) > self.max_keys:
            self._holders.popitem(last=False)

    def match(self, keys: Sequence[bytes], backends: Iterable[str]) -> dict[str, int]:
        """Cached prefix tokens per backend (only backends with a hit)."""
        alive = set(backends)
        hits: dict[str, int] = {}
        for number, key in enumerate(keys):
            holders = self._holders.get(key)
            if holders is None:
                break
            self._holders.move_to_end(key)
            alive &= holders
            if not alive:
                break
            for backend in alive:
                hits[backend] = (number + 1) * self.chunk_tokens
        return hits
