"""Segment splitting rules (kvtier.blend.segments): pure token logic, no model."""

from __future__ import annotations

from kvtier.blend.segments import find_separators, join, split

SEP = (7, 7)


def pieces(plan):
    return [plan.tokens[s:e] for s, e in plan.segments]


def test_no_separator_is_all_query() -> None:
    plan = split([1, 2, 3, 4], SEP)
    assert plan.segments == () and plan.query_start == 0 and plan.prefix_end == 0
    assert split([1, 2, 3], ()).segments == ()  # empty separator: nothing is split


def test_shorter_than_separator() -> None:
    assert split([7], SEP).segments == ()
    assert split([], SEP).num_tokens == 0
    assert find_separators([7], SEP) == []


def test_basic_split_and_query() -> None:
    plan = split([1, 2, 7, 7, 3, 7, 7, 4, 5], SEP)
    assert pieces(plan) == [(1, 2), (3,)]
    assert plan.tokens[plan.query_start :] == (4, 5)


def test_empty_segments_dropped() -> None:
    # leading, repeated and trailing separators produce empty pieces, which are skipped
    plan = split([7, 7, 1, 7, 7, 7, 7, 2, 7, 7], SEP)
    assert pieces(plan) == [(1,), (2,)]
    assert plan.query_start == plan.num_tokens  # empty query: the separator tail is fresh


def test_non_overlapping_match() -> None:
    assert find_separators([7, 7, 7, 1, 7, 7], SEP) == [0, 4]


def test_min_tokens_makes_short_pieces_fresh() -> None:
    plan = split([1, 7, 7, 2, 3, 4, 7, 7, 9], SEP, min_tokens=2)
    assert pieces(plan) == [(2, 3, 4)]


def test_prefix_piece() -> None:
    plan = split([1, 2, 7, 7, 3, 4, 7, 7, 5, 7, 7, 9], SEP, prefix=True)
    assert plan.prefix == (1, 2, 7, 7)
    assert pieces(plan) == [(3, 4), (5,)]
    # one separator only: prefix + query, no segments
    plan = split([1, 7, 7, 9], SEP, prefix=True)
    assert plan.prefix == (1, 7, 7) and plan.segments == () and plan.tokens[plan.query_start :] == (9,)


def test_join_keeps_segments_whole() -> None:
    plan = join([[1, 7, 7, 2], [], [3]], [9], SEP, prefix=[5])
    assert plan.tokens == (5, 1, 7, 7, 2, 7, 7, 3, 7, 7, 9)
    assert plan.prefix_end == 1
    assert pieces(plan) == [(1, 7, 7, 2), (3,)]
    assert plan.tokens[plan.query_start :] == (9,)
    # no separator: segments are simply concatenated
    assert join([[1], [2]], [3], ()).tokens == (1, 2, 3)
