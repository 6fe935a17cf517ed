"""Split a batch's rows into length buckets so that short rows are not padded to long ones.

A batch of requests with texts of 5 to 70 tokens, padded to its longest row, spends a large part
of its forward on padding. Running it as a few forwards over rows of similar length removes most
of that waste, at the price of a fixed cost per forward (kernel launches, Python, the cache
layout). :func:`length_buckets` picks the split that minimises

    sum over buckets of (overhead + rows_in_bucket * longest_row_in_bucket)

exactly, by dynamic programming over the rows sorted by length (buckets of a sorted order are
contiguous in an optimal split, so O(R^2) suffices).
"""

from __future__ import annotations

from collections.abc import Sequence

# Fixed cost of one more forward, in padded-token units. On CPU a token of a 135M model costs
# milliseconds, about as much as a forward's fixed cost. Measured on the infer bench's requests
# (SmolLM2-135M, 2 cores, batches of 32; requests/s by overhead): 0 -> 6.1 (a forward per
# length is too many), 16 -> 10.3, 64 -> 9.5, 256 -> 9.2, one forward -> 6.2. On an accelerator
# a token is nearly free until the device is saturated, so only large waste is worth another
# launch (not measured here: no GPU was available).
CPU_OVERHEAD_TOKENS = 16
ACCELERATOR_OVERHEAD_TOKENS = 4096


def length_buckets(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Group row indices into buckets that minimise padded tokens plus a per-forward overhead.

    Args:
        lengths: each row's length in tokens (R values, each >= 1).
        overhead_tokens: the cost of one more forward, in tokens; 0 gives one bucket per
            distinct length, a very large value one bucket.

    Returns:
        Lists of indices into ``lengths``, each sorted by length; every index appears once.
        The buckets are ordered from shortest to longest rows.
    """
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens must be >= 0, got {overhead_tokens}")
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    sizes = [lengths[index] for index in order]
    best = [0] * (len(order) + 1)  # best[i]: cost of the first i sorted rows
    cut = [0] * (len(order) + 1)  # cut[i]: start of the last bucket in that best split
    for end in range(1, len(order) + 1):
        longest = sizes[end - 1]
        best[end], cut[end] = min(
            (best[start] + overhead_tokens + (end - start) * longest, start) for start in range(end)
        )
    buckets = []
    end = len(order)
    while end > 0:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]
