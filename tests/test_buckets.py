"""Length buckets: an optimal split of sorted rows, every row once."""

from __future__ import annotations

import itertools
import random

import pytest

from softprompt.inference.buckets import length_buckets


def _cost(lengths: list[int], buckets: list[list[int]], overhead: int) -> int:
    return sum(overhead + len(bucket) * max(lengths[i] for i in bucket) for bucket in buckets)


def _brute_force(lengths: list[int], overhead: int) -> int:
    """Cheapest split over every set partition (not only contiguous runs of the sorted order)."""

    def partitions(items: list[int]):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for partition in partitions(rest):
            yield [[first], *partition]
            for index in range(len(partition)):
                yield [*partition[:index], [first, *partition[index]], *partition[index + 1 :]]

    return min(_cost(lengths, p, overhead) for p in partitions(list(range(len(lengths)))))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overhead", [0, 3, 10, 1000])
def test_split_is_optimal_and_covers_every_row(seed, overhead):
    generator = random.Random(seed)
    lengths = [generator.randint(1, 20) for _ in range(generator.randint(1, 7))]
    buckets = length_buckets(lengths, overhead)
    assert sorted(itertools.chain.from_iterable(buckets)) == list(range(len(lengths)))
    assert _cost(lengths, buckets, overhead) == _brute_force(lengths, overhead)
    longest = [max(lengths[i] for i in bucket) for bucket in buckets]
    assert longest == sorted(longest)


def test_extremes():
    lengths = [5, 70, 6, 65, 30]
    assert length_buckets(lengths, 10**6) == [[0, 2, 4, 3, 1]]  # one bucket, sorted by length
    assert length_buckets(lengths, 0) == [[0], [2], [4], [3], [1]]
    assert length_buckets([4, 4, 4], 0) == [[0, 1, 2]]  # equal lengths never split
    assert length_buckets([], 5) == []
    with pytest.raises(ValueError, match="overhead_tokens"):
        length_buckets(lengths, -1)


def test_mixed_lengths_cut_most_padding():
    generator = random.Random(0)
    lengths = [generator.randint(5, 70) for _ in range(32)]
    padded = len(lengths) * max(lengths)
    buckets = length_buckets(lengths, 64)
    assert 1 < len(buckets) < len(lengths)
    assert _cost(lengths, buckets, 64) < 0.8 * padded
