"""The record of one stored object, and the one rule that verifies a hit.

Every tier, the write-back path, the wire frame, the P2P peer and the SGLang backend describe a
stored object by a :class:`ChunkRecord`:

- ``key``: the 16-byte chunk key the object is stored under;
- ``parent``: the key of the chunk before it (the namespace root for the first chunk and for SGLang
  pages, whose engine hash already commits to the whole prefix);
- ``kind``: :attr:`Kind.TOKENS` for a kvtier token chunk, :attr:`Kind.PAGE` for an engine page;
- ``identity``: the bytes the object is verified by -- the chunk's token ids as uint32 little endian
  for ``TOKENS``, the engine's page hash for ``PAGE``;
- ``num_tokens``: token positions the object's KV covers.

Invariant (:func:`verify`): a stored object answers a request only if all five fields are equal. A
hash collision on ``key`` therefore is a miss, never foreign KV: for token chunks the identity is the
tokens themselves, and by induction over ``parent`` a hit on chunk ``i`` verifies the whole prefix.

Torch-free: the controller, router and cache server import this module.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import numpy as np

from kvtier.keys import Chunk, ChunkKey


class Kind(IntEnum):
    """What ``identity`` holds; part of the wire metadata, so values never change."""

    TOKENS = 0
    PAGE = 1


class ChunkRecord(NamedTuple):
    """Identity of one stored object (see the module docstring). A NamedTuple: built per chunk on the
    lookup hot path, and tuple equality is the verification rule."""

    key: ChunkKey
    parent: ChunkKey
    identity: bytes
    kind: Kind
    num_tokens: int


def verify(stored: ChunkRecord, expected: ChunkRecord) -> bool:
    """True iff ``stored`` may answer a request for ``expected``: key, parent, kind, identity and
    length all equal. The one hit check of kvtier (CPU tier, lower tiers, peers, SGLang pages)."""
    return stored == expected


def token_record(chunk: Chunk, tokens: np.ndarray) -> ChunkRecord:
    """The record of token chunk ``chunk`` of ``tokens`` (uint32-le ids, see
    :func:`kvtier.keys.as_token_array`)."""
    return ChunkRecord(chunk.key, chunk.parent, tokens[chunk.start : chunk.end].tobytes(), Kind.TOKENS,
                       chunk.end - chunk.start)


def token_records(chunks: list[Chunk], tokens: np.ndarray) -> list[ChunkRecord]:
    """:func:`token_record` of every chunk, slicing one bytes copy of ``tokens`` (about 2x cheaper
    than slicing the array per chunk)."""
    data = tokens.tobytes()
    tokens_kind = Kind.TOKENS
    return [ChunkRecord(c.key, c.parent, data[c.start * 4 : c.end * 4], tokens_kind, c.end - c.start)
            for c in chunks]
