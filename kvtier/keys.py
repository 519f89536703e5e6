"""Token chunking and chained chunk keys.

Chunks are ``[0, C)``, ``[C, 2C)``, ... with ``C = chunk_tokens``. The key of chunk ``i`` is

    k_0     = BLAKE3(namespace)[:16]
    k_{i+1} = XXH3-128(k_i || uint32-le(tokens of chunk i))

so it depends on the namespace (model id, KV spec, codec, tenant salt) and on every token up to the
chunk's end, including the chunk's exact length. Nothing here depends on the process (no ``hash()``,
no seed): every process on every machine computes the same keys.

Why XXH3-128 for the chain: a 32K-token prompt has 128 chunks, and a per-chunk BLAKE3 call costs ~3 us
here (0.4 ms per lookup) against ~0.35 us for XXH3-128. The chain needs a stable 128-bit hash, not
collision resistance: a colliding key can never deliver foreign KV, because every hit is verified
against the stored tokens and parent key (below); an adversarial collision can at worst cause a miss.

Partial last chunk: a trailing chunk shorter than ``C`` gets a key of its own like any other (its
length is part of the hashed bytes). A longer prompt that extends the same text computes a different,
full chunk at that index, so a stored partial chunk hits only prompts that end on the same token.
``Chunker(..., partial=False)`` drops the trailing partial chunk instead.

Verification: each stored chunk keeps its token ids and its parent key (``k_i`` of the previous chunk).
A hit counts only if both match what the caller computed, so by induction a hit on chunk ``i``
verifies the whole prefix; a hash collision is a miss, never foreign KV.
"""

from __future__ import annotations

import array
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import blake3
import numpy as np
import xxhash

from kvtier.layout import KVSpec

if TYPE_CHECKING:
    import torch

KEY_BYTES = 16
ChunkKey = bytes  # KEY_BYTES raw bytes; ``key.hex()`` is the text form used in file names and remote keys

Tokens: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"


def as_token_array(tokens: Tokens) -> np.ndarray:
    """Return ``tokens`` as a 1-D contiguous little-endian uint32 array (a view when possible).

    A torch tensor is accepted by duck typing (``detach``), so this module never imports torch."""
    if isinstance(tokens, (list, tuple)):
        try:  # array.array converts a list of ints ~3x faster than np.asarray
            return np.frombuffer(array.array("I", tokens), dtype="<u4")
        except (OverflowError, TypeError):
            pass  # negative, huge or non-int entries: the checks below report them
    if hasattr(tokens, "detach"):  # a torch tensor, possibly on another device
        tokens = tokens.detach().reshape(-1).cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype != np.dtype("<u4"):
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise ValueError("token ids must be in [0, 2**32)")
        arr = arr.astype("<u4")
    return np.ascontiguousarray(arr)


def _digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest(length=KEY_BYTES)


_xxh3_128 = xxhash.xxh3_128_digest


def chain_key(parent: ChunkKey, token_bytes: bytes) -> ChunkKey:
    """``k_{i+1}`` from ``k_i`` and the uint32-le bytes of chunk ``i``'s tokens: the one definition of
    the chain, shared by engines, the controller and peers."""
    return _xxh3_128(parent + token_bytes)


def chain(root: ChunkKey, ids: np.ndarray, chunk_tokens: int, count: int) -> list[ChunkKey]:
    """``[k_0 = root, k_1, ..., k_count]`` over the first ``count`` chunks of ``ids`` (a contiguous
    uint32-le array; the last chunk may be short). The keys of engine lookups, the controller and the
    router: :func:`hashed_chain`'s."""
    return [root, *hashed_chain(root, ids, chunk_tokens, count)[0]]


def hashed_chain(root: ChunkKey, ids: np.ndarray, chunk_tokens: int,
                 count: int) -> tuple[list[ChunkKey], list[bytes]]:
    """``[k_1, ..., k_count]`` and, per key, the bytes it was hashed from (``k_i || tokens of chunk
    i``, what :func:`chain_key` hashes): :func:`chain_key` in a bare loop over a view of the ids (no copy
    of the array). The hashed bytes are kept because they are the parent and identity a hit is verified
    by (:meth:`kvtier.storage.cpu.CpuTier.leading_hits` compares them whole); keeping them costs one
    append per chunk."""
    data = ids.data.cast("B")
    digest = _xxh3_128
    keys: list[ChunkKey] = []
    hashed: list[bytes] = []
    parent = root
    step = 4 * chunk_tokens
    for offset in range(0, step * count, step):
        blob = parent + data[offset : offset + step]  # a short last slice stops at the end
        hashed.append(blob)
        parent = digest(blob)
        keys.append(parent)
    return keys, hashed


@dataclass(frozen=True)
class Namespace:
    """What separates caches that must never exchange chunks."""

    model: str
    spec: KVSpec
    codec: str = "raw"
    tenant: str = ""

    def root(self) -> ChunkKey:
        """``k_0``: the parent key of the first chunk."""
        text = "\x1f".join(("kvtier/v2", self.model, self.spec.fingerprint(), self.codec, self.tenant))
        return _digest(text.encode())


class Chunk(NamedTuple):
    """One chunk of a token sequence: tokens ``[start, end)``, its key and its parent's key.

    A NamedTuple because lookups build one per chunk on the hot path."""

    number: int
    start: int
    end: int
    key: ChunkKey
    parent: ChunkKey

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


_new_chunk = functools.partial(tuple.__new__, Chunk)  # Chunk from one (number, start, end, key, parent)


class Chunker:
    """Splits token sequences into keyed chunks for one namespace. Stateless and thread-safe."""

    def __init__(self, namespace: Namespace, *, partial: bool = True) -> None:
        self.namespace = namespace
        self.chunk_tokens = namespace.spec.chunk_tokens
        self.partial = partial
        self._root = namespace.root()

    def hashed(self, tokens: Tokens, *, limit: int | None = None) -> tuple[np.ndarray, list[ChunkKey], list[bytes]]:
        """The token array, the keys ``k_1 ... k_count`` of its chunks in order and the bytes each key
        was hashed from (:func:`hashed_chain`): the lookup hot path, which needs no :class:`Chunk`.

        ``limit`` stops after that many chunks (lookups use it to avoid hashing what cannot hit).
        """
        arr = as_token_array(tokens)
        c = self.chunk_tokens
        stop = len(arr) if self.partial else len(arr) - len(arr) % c
        count = -(-stop // c)
        if limit is not None:
            count = min(count, max(limit, 0))
        return (arr, *hashed_chain(self._root, arr, c, count))

    def chunks(self, tokens: Tokens, *, limit: int | None = None) -> tuple[np.ndarray, list[Chunk]]:
        """Return the token array and its chunks in order (``limit`` as in :meth:`hashed`)."""
        arr, keys, _hashed = self.hashed(tokens, limit=limit)
        return arr, self.chunks_of(arr, keys)

    def chunks_of(self, arr: np.ndarray, keys: list[ChunkKey]) -> list[Chunk]:
        """The :class:`Chunk` tuples of the first ``len(keys)`` chunks of ``arr``, given their keys
        (from :meth:`hashed`), built by C-level map."""
        count = len(keys)
        if count == 0:
            return []
        c = self.chunk_tokens
        ends = list(range(c, (count + 1) * c, c))
        ends[-1] = min(ends[-1], len(arr))
        parents = [self._root, *keys[:-1]]
        return list(map(_new_chunk, zip(range(count), range(0, count * c, c), ends, keys, parents)))
