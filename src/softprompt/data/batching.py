"""Batch index plans and padding.

`length_grouped_batches` groups examples of similar length to cut padding while keeping batches
random: shuffle all indices with a seeded generator, cut them into pools of
``batch_size * pool_factor``, sort each pool by length, cut pools into batches, shuffle the batch
order. The plan depends only on the lengths and the seed (NumPy's PCG64 ``default_rng``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    pool_factor: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """Plans one epoch of batches of similar-length examples.

    Args:
        lengths: Length (e.g. token count) of each example, shape (N,).
        batch_size: Examples per batch.
        seed: Seed of the shuffles; the same seed gives the same plan.
        pool_factor: Pool size in batches; 1 sorts nothing across batches (each pool is one
            batch), larger values group lengths more tightly.
        drop_last: Drop the one batch smaller than ``batch_size`` (the tail of the last pool).

    Returns:
        list[list[int]]: Batches of example indices; every index appears exactly once (unless
        dropped with ``drop_last``).

    Raises:
        ValueError: A non-positive batch_size or pool_factor, or a negative length.
    """
    _check_batch_size(batch_size)
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, int) or pool_factor < 1:
        raise ValueError(f"pool_factor must be a positive integer, got {pool_factor!r}")
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if sizes.size and sizes.min() < 0:
        raise ValueError(f"lengths must be >= 0; index {int(sizes.argmin())} is {int(sizes.min())}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(sizes.size)
    pool_size = batch_size * pool_factor
    batches: list[list[int]] = []
    for start in range(0, order.size, pool_size):
        pool = order[start : start + pool_size]
        pool = pool[np.argsort(sizes[pool], kind="stable")]
        batches.extend(pool[i : i + batch_size].tolist() for i in range(0, pool.size, batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [batches[i] for i in rng.permutation(len(batches))]


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    """Cuts ``range(n)`` into consecutive batches, the last possibly smaller (for evaluation).

    Args:
        n: Number of examples.
        batch_size: Examples per batch.

    Returns:
        list[list[int]]: ``[[0..b-1], [b..2b-1], ...]``.
    """
    _check_batch_size(batch_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of pad tokens when each batch is padded to its longest example.

    Args:
        lengths: Length of each example, shape (N,).
        batches: Batches of indices into ``lengths``.

    Returns:
        float: ``padded tokens / total tokens`` over the padded batches; 0.0 when empty.
    """
    padded = real = 0
    for batch in batches:
        if not batch:
            continue
        sizes = [int(lengths[i]) for i in batch]
        padded += max(sizes) * len(sizes)
        real += sum(sizes)
    return (padded - real) / padded if padded else 0.0


def pad_batch(
    sequences: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token id sequences to one length.

    Args:
        sequences: B token id lists.
        pad_id: Id written into padded positions.
        side: ``"right"`` (pads after the tokens) or ``"left"`` (before, for generation).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``input_ids`` LongTensor (B, T) and
        ``attention_mask`` LongTensor (B, T), 1 on real tokens; T is the longest length.

    Raises:
        ValueError: No sequences, or a side other than left/right.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask
