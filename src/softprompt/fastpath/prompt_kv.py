"""Prompt KV caches and the padded layout of a mixed-prompt batch.

A soft prompt is the same for every request of its task, so its keys and values (every layer)
are computed once, when the task is added, and reused by each batch: a batch then runs the model
on the text tokens only. Rows may carry prompts of different lengths (different tasks, ensemble
members), so each row is laid out as::

    [prompt padding | prompt_i (n_i) | text_i (t_i) | text padding]
     N - n_i          N                T

where N is the longest prompt in the batch and T the longest text. Padding is masked out and
position ids count from each row's own prompt (``0 .. n_i - 1``, then ``n_i + arange(T)``), so a
row sees exactly what it would see alone. Real tokens stay contiguous, which also keeps
sliding-window attention (masked by cache index) identical to a solo run.

The uncached path (:func:`build_batch` with ``use_cache=False``) builds the same layout out of
embeddings and runs the prompt through the model each time; the two paths agree to rounding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache


class PromptCacheUnsupportedError(RuntimeError):
    """The model's cache is not a plain per-layer key/value cache (e.g. linear-attention layers)."""


@dataclass(frozen=True)
class PromptKV:
    """One prompt's keys and values for every layer.

    Attributes:
        layers: per layer ``(keys, values)``, each ``(1, kv_heads, n, head_dim)`` in the model's
            dtype on its device, computed at positions ``0 .. n - 1``.
        length: n.
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int

    @property
    def nbytes(self) -> int:
        """Memory held by the keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


@dataclass(frozen=True)
class Row:
    """One model row: a prompt and the text tokens that follow it.

    Attributes:
        prompt: ``(n, H)`` prompt embeddings in the model's dtype.
        prompt_kv: the prompt's cache, or None for the uncached path.
        token_ids: the text tokens (non-empty, unpadded).
    """

    prompt: torch.Tensor
    prompt_kv: PromptKV | None
    token_ids: list[int]


@dataclass
class BatchInputs:
    """A padded batch in the layout of the module docstring.

    Attributes:
        inputs_embeds: ``(R, L, H)``; L = T with a cache (text only), N + T without.
        attention_mask: ``(R, N + T)`` long, always covering prompt and text.
        position_ids: ``(R, L)`` long.
        cache: the prompt cache (``N`` positions), or None.
        text_offset: column of text token 0 in ``inputs_embeds`` (and in the hidden states).
        prompt_lengths: ``(R,)`` long, n_i.
        text_lengths: ``(R,)`` long, t_i.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: DynamicCache | None
    text_offset: int
    prompt_lengths: torch.Tensor
    text_lengths: torch.Tensor

    def last_text_index(self) -> torch.Tensor:
        """``(R,)`` column of each row's last text token in the hidden states."""
        return self.text_offset + self.text_lengths - 1


def cache_argument(body: nn.Module) -> str:
    """The name the model body's forward gives its cache argument.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated), so the
    name is read from the signature instead of being assumed.
    """
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache(config: Any) -> DynamicCache:
    """An empty cache for a batch.

    With ``config`` the cache knows which layers use sliding-window attention and keeps only
    their last window of keys (Gemma 2/3); plain ``DynamicCache()`` would keep every position of
    every layer, which is still correct (masks are built by cache index) but wastes memory.
    """
    return DynamicCache(config=config)


@torch.no_grad()
def compute_prompt_kv(body: nn.Module, prompt: torch.Tensor) -> PromptKV:
    """Run the model body on a prompt alone and keep its keys and values.

    A config-less ``DynamicCache`` is used on purpose: it stores every position of every layer,
    sliding-window layers included (their masks are computed by index, so the values are
    exact), and a batch cache built from it can then be cut to any window.

    Args:
        body: the decoder body (``model.base_model`` of a causal LM).
        prompt: ``(n, H)`` prompt embeddings in the model's dtype, on its device.

    Returns:
        The prompt's per-layer keys and values at positions ``0 .. n - 1``.

    Raises:
        PromptCacheUnsupportedError: the model's cache holds something other than plain keys
            and values for every layer.
    """
    length = prompt.shape[0]
    cache = DynamicCache()
    device = prompt.device
    body(
        inputs_embeds=prompt.unsqueeze(0),
        attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
        position_ids=torch.arange(length, device=device).unsqueeze(0),
        use_cache=True,
        **{cache_argument(body): cache},
    )
    layers = []
    for index, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.ndim != 4 or keys.shape[-2] != length:
            raise PromptCacheUnsupportedError(
                f"layer {index} of the model's cache ({type(layer).__name__}) is not a plain "
                "key/value cache; the prompt KV cache cannot be used with this model"
            )
        layers.append((keys.detach().clone(), values.detach().clone()))
    if not layers:
        raise PromptCacheUnsupportedError("the model filled no cache layers")
    return PromptKV(tuple(layers), length)


def _pad_text(
    rows: list[Row], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(R, T)`` token ids and ``(R,)`` lengths."""
    lengths = torch.tensor([len(row.token_ids) for row in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row.token_ids)] = torch.tensor(row.token_ids, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def _prompt_groups(rows: list[Row]) -> list[tuple[Row, list[int]]]:
    """Rows grouped by prompt tensor identity, so each distinct prompt is copied once."""
    groups: dict[int, tuple[Row, list[int]]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(id(row.prompt), (row, []))[1].append(index)
    return list(groups.values())


def _batch_cache(rows: list[Row], width: int, config: Any, device: torch.device) -> DynamicCache:
    """A cache whose row i holds prompt i's keys/values left-padded to ``width`` positions."""
    groups = _prompt_groups(rows)
    first = rows[0].prompt_kv
    cache = new_cache(config)
    for layer_index in range(len(first.layers)):
        keys, values = (
            reference.new_zeros(len(rows), reference.shape[1], width, reference.shape[-1])
            for reference in first.layers[layer_index]
        )
        for row, indices in groups:
            prompt_keys, prompt_values = row.prompt_kv.layers[layer_index]
            index = torch.tensor(indices, device=keys.device)
            start = width - row.prompt_kv.length
            keys[index, :, start:] = prompt_keys.to(keys.device)
            values[index, :, start:] = prompt_values.to(values.device)
        # The cache's own update does the bookkeeping (lengths, sliding-window cut).
        cache.update(keys.to(device), values.to(device), layer_index)
    return cache


@torch.no_grad()
def build_batch(
    rows: list[Row],
    embeddings: nn.Module,
    pad_id: int,
    *,
    use_cache: bool,
    config: Any,
) -> BatchInputs:
    """Lay out rows with different prompts as one padded batch.

    Args:
        rows: the batch's rows; with ``use_cache`` each needs ``prompt_kv``.
        embeddings: the model's input embedding module (embeds the text tokens).
        pad_id: token id used for text padding (masked out).
        use_cache: put the prompts in a fresh cache instead of in ``inputs_embeds``.
        config: the model's config (for the cache's sliding-window layers).

    Returns:
        The batch; with a cache, run the body with it (the forward mutates it, so it must not be
        shared between forwards).
    """
    device = embeddings.weight.device
    text_ids, text_lengths = _pad_text(rows, pad_id, device)
    text_embeds = embeddings(text_ids)  # (R, T, H)
    batch, length = text_ids.shape
    prompt_lengths = torch.tensor([row.prompt.shape[0] for row in rows], device=device)
    width = int(prompt_lengths.max())
    columns = torch.arange(width, device=device).unsqueeze(0)
    text_columns = torch.arange(length, device=device).unsqueeze(0)
    prompt_mask = (columns >= (width - prompt_lengths).unsqueeze(1)).long()  # (R, N)
    text_mask = (text_columns < text_lengths.unsqueeze(1)).long()  # (R, T)
    attention_mask = torch.cat([prompt_mask, text_mask], dim=1)
    text_positions = prompt_lengths.unsqueeze(1) + text_columns
    if use_cache:
        cache = _batch_cache(rows, width, config, device)
        return BatchInputs(
            text_embeds, attention_mask, text_positions, cache, 0, prompt_lengths, text_lengths
        )
    prompts = text_embeds.new_zeros(batch, width, text_embeds.shape[-1])
    for row, indices in _prompt_groups(rows):
        n = row.prompt.shape[0]
        prompts[torch.tensor(indices, device=device), width - n :] = row.prompt.to(prompts.dtype)
    prompt_positions = (columns - (width - prompt_lengths).unsqueeze(1)).clamp(min=0)
    return BatchInputs(
        torch.cat([prompts, text_embeds], dim=1),
        attention_mask,
        torch.cat([prompt_positions, text_positions], dim=1),
        None,
        width,
        prompt_lengths,
        text_lengths,
    )


@torch.no_grad()
def run_body(
    body: nn.Module, batch: BatchInputs, cache: DynamicCache | None = None
) -> torch.Tensor:
    """Final hidden states of the decoder body for a batch.

    Args:
        body: the decoder body.
        batch: from :func:`build_batch`.
        cache: a cache to fill when the batch has none (generation without a prompt cache).

    Returns:
        ``(R, L, H)`` hidden states after the final norm, aligned with ``batch.inputs_embeds``.
    """
    cache = batch.cache if batch.cache is not None else cache
    output = body(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=cache is not None,
        **({cache_argument(body): cache} if cache is not None else {}),
    )
    return output.last_hidden_state
