"""Activation checkpointing of the frozen decoder blocks (``--gradient-checkpointing``).

A prompt's gradient flows back through every block, so autograd keeps each block's inner
activations (attention, MLP) from the forward until the backward: with long inputs or large
batches they, not the frozen weights, fill the memory. Checkpointed, a block keeps only its
input; the backward runs the block's forward again to rebuild the rest (about one more forward
of compute per step). Evaluation and serving, which run without gradients, are not affected.

A recomputed block must see the same inputs twice, so it cannot write keys/values into a cache
(the second run would append them again): training then runs each batch as one forward of
``[prompt, text]`` instead of the shared-prefix fast path, and deep prompts, which live in that
cache, are refused by the options.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

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


def _checkpointed(forward: Any) -> Any:
    """``forward`` (a block's), checkpointed while gradients are recorded."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
            raise RuntimeError(
                "a checkpointed block cannot write into a keys/values cache while it records "
                "gradients: its recomputation would write them twice"
            )
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
