"""Splitting a prompt into a prefix, reusable segments and fresh tokens.

Layout: ``prefix seg_1 SEP seg_2 SEP ... seg_n SEP query``. Rules (the invariants tests check):

- The separator is a token run (the separator text tokenized alone, no special tokens), matched exactly,
  left to right, without overlap. An empty run means "no separator": nothing is split.
- The *prefix* (possibly empty) is the prompt's shared head, e.g. the system prompt. It is reused as an
  ordinary prefix cache entry (exact: it is always at position 0), and it is the context every segment's
  KV is computed in (see :mod:`kvtier.blend.engine`). In split mode it is the first piece together with
  the separator that ends it (when ``prefix=True`` and the prompt has a separator).
- Everything after the last separator is the *query*: always computed fresh, never cached. A prompt
  without a separator is all query (a plain full prefill).
- Every non-empty piece between the prefix and the query is a *segment*: its KV is cached on its own and
  reused wherever it appears. Empty pieces (leading, trailing or repeated separators) are dropped; a
  piece shorter than ``min_tokens`` is computed fresh instead of cached.
- Separator tokens belong to no segment; they are computed fresh like the query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TokenIds = Sequence[int]


def separator_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Token run of ``text`` tokenized alone, without special tokens (``""`` gives ``()``)."""
    if not text:
        return ()
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])


def find_separators(tokens: TokenIds, sep: TokenIds) -> list[int]:
    """Start indices of the non-overlapping occurrences of ``sep`` in ``tokens``, left to right."""
    n, m = len(tokens), len(sep)
    if m == 0 or n < m:
        return []
    sep_list = list(sep)
    first = sep_list[0]
    found: list[int] = []
    i = 0
    while i <= n - m:
        if tokens[i] == first and list(tokens[i : i + m]) == sep_list:
            found.append(i)
            i += m
        else:
            i += 1
    return found


@dataclass(frozen=True)
class Plan:
    """Token ids of one prompt, its prefix length and the ``[start, end)`` ranges of its segments.

    Invariant: ``0 <= prefix_end <= s_1 < e_1 <= s_2 < ... <= e_n <= query_start <= len(tokens)``; every
    token outside the prefix and the segments (separators, short pieces, the query) is computed fresh.
    """

    tokens: tuple[int, ...]
    prefix_end: int
    segments: tuple[tuple[int, int], ...]
    query_start: int

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prefix(self) -> tuple[int, ...]:
        return self.tokens[: self.prefix_end]


def split(tokens: TokenIds, sep: TokenIds, min_tokens: int = 1, prefix: bool = False) -> Plan:
    """Plan for a prompt given as one token sequence (see the module rules)."""
    toks = tuple(int(t) for t in tokens)
    starts = find_separators(toks, sep)
    if not starts:
        return Plan(toks, 0, (), 0)
    m = len(sep)
    prefix_end = starts[0] + m if prefix else 0
    segments: list[tuple[int, int]] = []
    begin = prefix_end
    for s in starts:
        if s < begin:
            continue  # the separator that ends the prefix
        if s - begin >= max(1, min_tokens):
            segments.append((begin, s))
        begin = s + m
    return Plan(toks, prefix_end, tuple(segments), begin)


def join(segments: Sequence[TokenIds], query: TokenIds, sep: TokenIds, min_tokens: int = 1,
         prefix: TokenIds = ()) -> Plan:
    """Plan for ``prefix seg_1 SEP ... seg_n SEP query`` with the segments taken exactly as given.

    Unlike :func:`split`, a segment that itself contains the separator run is not split further. Empty
    segments are skipped (no separator is emitted for them). The prefix is used as is: end it with
    whatever delimiter the prompt needs.
    """
    toks: list[int] = [int(t) for t in prefix]
    ranges: list[tuple[int, int]] = []
    for seg in segments:
        if len(seg) == 0:
            continue
        start = len(toks)
        toks.extend(int(t) for t in seg)
        if len(seg) >= min_tokens:
            ranges.append((start, len(toks)))
        toks.extend(sep)
    query_start = len(toks)
    toks.extend(int(t) for t in query)
    return Plan(tuple(toks), len(prefix), tuple(ranges), query_start)
