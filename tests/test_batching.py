from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.batching import cut


def test_cuts_by_count_bytes_and_break() -> None:
    sizes = [3, 3, 3, 10, 1, 1, 1, 1]
    assert cut(sizes, 2, 100, int) == [[3, 3], [3, 10], [1, 1], [1, 1]]
    assert cut(sizes, 10, 6, int) == [[3, 3], [3], [10], [1, 1, 1, 1]]  # 10 > 6 stands alone
    assert cut(sizes, 10, 100, int, lambda a, b: a != b) == [[3, 3, 3], [10], [1, 1, 1, 1]]
    assert cut([], 4, 4, int) == []


def test_rejects_an_empty_batch_size() -> None:
    with pytest.raises(ValueError, match="max_count"):
        cut([1], 0, 10, int)


@given(st.lists(st.integers(0, 20)), st.integers(1, 5), st.integers(0, 30))
def test_batches_are_greedy_bounded_and_complete(sizes: list[int], count: int, limit: int) -> None:
    batches = cut(sizes, count, limit, int, lambda a, b: a == 7)
    assert [s for b in batches for s in b] == sizes
    for i, batch in enumerate(batches):
        assert batch and len(batch) <= count
        assert sum(batch) <= limit or len(batch) == 1
        assert all(prev != 7 for prev in batch[:-1])  # a break starts a new batch
        if i + 1 < len(batches):  # greedy: the next item did not fit or a break came first
            nxt = batches[i + 1][0]
            assert len(batch) == count or sum(batch) + nxt > limit or batch[-1] == 7
