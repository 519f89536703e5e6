"""Block hashes exactly as vLLM's prefix cache computes them (``vllm.v1.core.kv_cache_utils``).

vLLM hashes each *full* block of ``block_size`` tokens as ``H((parent, tuple(token_ids), extra_keys))``
where ``H`` is the configured ``--prefix-caching-hash-algo``:

- ``sha256``: SHA-256 of the pickled tuple (pickle protocol ``HIGHEST_PROTOCOL``),
- ``sha256_cbor``: SHA-256 of its canonical CBOR encoding,
- ``xxhash`` / ``xxhash_cbor``: XXH3-128 of the pickled / CBOR bytes,

and the parent of the first block is ``NONE_HASH = H(seed)``. The seed is ``$PYTHONHASHSEED`` when set;
otherwise ``"vllm-none-hash"`` for the SHA-256 algorithms and a per-process random value for the xxhash
ones (then only a shared ``PYTHONHASHSEED`` makes hashes reproducible across processes: kvtier needs
it too). kvtier bypasses requests with extra keys (LoRA, multimodal, cache salt), so ``extra_keys`` is
always ``None`` here. Events carry hashes as vLLM's ``ExternalBlockHash``: the raw bytes, or with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` (vLLM's default) the low 64 bits as a big-endian int.

Pickling here only *serializes* local token ids to hash them, as vLLM does; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_SEED = "vllm-none-hash"
ExternalHash = bytes | int


def _cbor(obj: Any) -> bytes:
    import cbor2  # the vLLM extra installs it; only the *_cbor algorithms need it

    return bytes(cbor2.dumps(obj, canonical=True))


def _pickled(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def hash_function(algo: str) -> Callable[[Any], bytes]:
    """vLLM's hash function named ``algo`` (one of :data:`ALGOS`)."""
    serialize = {"sha256": _pickled, "sha256_cbor": _cbor, "xxhash": _pickled, "xxhash_cbor": _cbor}.get(algo)
    if serialize is None:
        raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}; expected one of {ALGOS}")
    if algo.startswith("sha256"):
        return lambda obj: hashlib.sha256(serialize(obj)).digest()
    return lambda obj: xxhash.xxh3_128_digest(serialize(obj))


def default_seed(algo: str) -> str | None:
    """The NONE_HASH seed vLLM uses for ``algo`` in a process started with this environment; ``None``
    when vLLM would pick a random one (xxhash without ``PYTHONHASHSEED``)."""
    seed = os.environ.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    return DEFAULT_SEED if algo.startswith("sha256") else None


def int_hashes_default() -> bool:
    """vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` (default on)."""
    return bool(int(os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")))


class BlockHasher:
    """vLLM block hashes for one (algorithm, block size, seed). Stateless after construction."""

    def __init__(self, algo: str = "sha256", block_size: int = 16, seed: str | None = None,
                 int_hashes: bool | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.algo = algo
        self.block_size = block_size
        self._hash = hash_function(algo)
        chosen = seed if seed is not None else default_seed(algo)
        if chosen is None:
            raise ValueError(f"vLLM seeds {algo!r} block hashes randomly per process unless PYTHONHASHSEED "
                             "is set: set it (the same value) for vLLM and kvtier, or use sha256")
        self.none_hash = self._hash(chosen)
        self.int_hashes = int_hashes_default() if int_hashes is None else int_hashes

    def chain(self, parent: bytes | None, tokens: Sequence[int]) -> list[bytes]:
        """Hashes of the full blocks of ``tokens`` (a trailing partial block is skipped), the first one
        chained to ``parent`` (``None``: the start of a sequence)."""
        out: list[bytes] = []
        prev = parent if parent else self.none_hash
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            prev = self._hash((prev, tuple(int(t) for t in tokens[start : start + bs]), None))
            out.append(prev)
        return out

    def external(self, block_hash: bytes) -> ExternalHash:
        """``block_hash`` as vLLM's events carry it."""
        if not self.int_hashes:
            return block_hash
        return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)
