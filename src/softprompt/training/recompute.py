"""Activation checkpointing of the frozen decoder blocks (``--gradient-checkpointing``).

A prompt's gradient flows back through every block, so autograd keeps each block's inner
activations (attention, MLP) from the forward until the backward: with long inputs or large
batches they, not the frozen weights, fill the memory. Checkpointed, a block keeps only its
input; the backward runs the block's forward again to rebuild the rest (about one more forward
of compute per step). Evaluation and serving, which run without gradients, are not affected.

A recomputed block must see the same inputs twice, and one of them may be a keys/values cache:
the fast path runs the text behind the prompt's cached keys/values (a deep prompt *is* that
cache), and the block's forward appends the text's keys/values to it. By the time the backward
recomputes the block, the cache has moved on, so the recomputation runs against the cache as
the first run found it (:class:`CacheState`), and the cache is then put back as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Cache

from softprompt.training.distributed import decoder_layers

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the name transformers 5 and 4 give a layer


def recompute_blocks_in_backward(model: torch.nn.Module) -> int:
    """Checkpoint every decoder block of ``model`` (non-reentrant ``torch.utils.checkpoint``)
    whenever gradients are enabled; without them a block runs as before.

    Returns:
        The number of blocks checkpointed.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)
    return len(layers)


@dataclass(frozen=True)
class CacheState:
    """What a transformers cache holds at one moment, to be put back later.

    A cache layer's ``update`` replaces its tensors (``torch.cat``) instead of writing into them,
    so references to its attributes, and the list of layers, are a faithful copy at no cost.
    """

    layers: tuple[Any, ...]
    attributes: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, cache: Cache) -> CacheState:
        return cls(tuple(cache.layers), tuple(dict(vars(layer)) for layer in cache.layers))

    def restore(self, cache: Cache) -> None:
        cache.layers[:] = self.layers
        for layer, attributes in zip(self.layers, self.attributes, strict=True):
            vars(layer).clear()
            vars(layer).update(attributes)


def _checkpointed(forward: Any) -> Any:
    """``forward`` (a block's), checkpointed while gradients are recorded."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        cache = next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
        if cache is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        found = CacheState.of(cache)
        runs = 0

        def against_found_cache(*args: Any, **kwargs: Any) -> Any:
            nonlocal runs
            runs += 1
            if runs == 1:  # the forward: the cache is as the block found it
                return forward(*args, **kwargs)
            now = CacheState.of(cache)  # the recomputation, in the backward
            found.restore(cache)
            try:
                return forward(*args, **kwargs)
            finally:
                now.restore(cache)

        return checkpoint(against_found_cache, *args, use_reentrant=False, **kwargs)

    return run
