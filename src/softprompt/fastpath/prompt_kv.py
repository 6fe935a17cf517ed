"""Prompt keys and values: the one place that turns prompts into per-layer keys/values and runs
the frozen model's body after them.

A soft prompt's keys and values are the same for every text that follows it, so they are
computed once (per batch in training, with gradients; per task in serving, without) and the
body then runs on the text tokens only. The same move serves any shared prefix: a text scored
against several multi-token label words is run once and its keys/values extended to the label
continuations (:func:`extend_prefix`).

Rows may carry prefixes of different lengths (tasks, ensemble members), so a batch is laid out
as::

    [prefix padding | prefix_i (n_i) | text_i (t_i) | text padding]
     W - n_i          W                T

where W is the longest prefix and T the longest text. Padding is masked out and positions count
from each row's own prefix (``0 .. n_i - 1``, then ``n_i + arange(T)``), so a row sees exactly
what it would see alone. Real tokens stay contiguous, which also keeps sliding-window attention
(masked by position index) identical to a solo run.

:func:`uncached_batch` builds the same layout out of embeddings (the prompt runs through the
model with the text): the reference the cached path is tested against, and the fallback for
models whose cache is not plain keys/values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from softprompt.fastpath.frozen import FrozenModel


class PromptCacheUnsupportedError(RuntimeError):
    """The model's cache is not a plain per-layer key/value cache (e.g. linear-attention layers)."""


@dataclass(frozen=True)
class PromptKV:
    """Keys and values of one prefix per row, right-aligned to a common width.

    Attributes:
        layers: per layer ``(keys, values)``, each ``(R, kv_heads, W, head_dim)`` in the model's
            dtype; R = 1 for a single prompt (broadcast over a batch).
        lengths: ``(R,)`` long: row i's prefix fills its last ``lengths[i]`` columns, at
            positions ``0 .. lengths[i] - 1``.
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    lengths: torch.Tensor

    @property
    def rows(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def width(self) -> int:
        """W, the longest prefix."""
        return self.layers[0][0].shape[-2]

    @property
    def nbytes(self) -> int:
        """Memory held by the keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def select(self, index: torch.Tensor) -> PromptKV:
        """The rows ``index`` ``(R',)`` (a row may repeat)."""
        index = index.to(self.layers[0][0].device)
        layers = tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers)
        return PromptKV(layers, self.lengths.index_select(0, index.to(self.lengths.device)))


@dataclass
class PrefixedBatch:
    """Texts behind their prefixes, padded in the layout of the module docstring.

    Attributes:
        inputs_embeds: ``(R, L, H)``; L = T with a cache (text only), W + T without.
        attention_mask: ``(R, W + T)`` long over prefix and text (``(R, T)`` without a prefix).
        position_ids: ``(R, L)`` long.
        cache: the prefixes' keys/values (W positions); a forward appends to it, so it serves
            one forward only. None when the prefixes are in ``inputs_embeds`` or absent.
        text_offset: column of text token 0 in ``inputs_embeds`` (and in the hidden states).
        prefix_lengths: ``(R,)`` long, n_i.
        text_lengths: ``(R,)`` long, t_i.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: DynamicCache | None
    text_offset: int
    prefix_lengths: torch.Tensor
    text_lengths: torch.Tensor

    def last_text_index(self) -> torch.Tensor:
        """``(R,)`` column of each row's last text token in the hidden states."""
        return self.text_offset + self.text_lengths - 1


def compute_prompt_kv(frozen: FrozenModel, prompt: torch.Tensor) -> PromptKV:
    """Run the body on a prompt alone (positions ``0 .. n - 1``) and keep its keys and values.

    Differentiable with respect to ``prompt`` when gradients are enabled (training); call it
    under ``torch.no_grad()`` to cache a prompt for serving.

    Args:
        frozen: the frozen model.
        prompt: ``(n, H)`` prompt embeddings (any float dtype; cast to the model's).

    Returns:
        A one-row :class:`PromptKV`.

    Raises:
        PromptCacheUnsupportedError: the model's cache holds something other than plain keys
            and values for every layer.
    """
    length = prompt.shape[0]
    device = frozen.device
    cache = frozen.new_cache(sliding=False)  # every position of every layer, read back below
    frozen.hidden_states(
        prompt.to(device=device, dtype=frozen.dtype).unsqueeze(0),
        torch.ones(1, length, dtype=torch.long, device=device),
        torch.arange(length, device=device).unsqueeze(0),
        cache,
    )
    layers = _plain_layers(cache, length)
    return PromptKV(layers, torch.tensor([length], device=device))


def prompt_cache_supported(frozen: FrozenModel) -> bool:
    """Whether the model's cache is plain keys/values (tried on a one-token prompt)."""
    try:
        with torch.no_grad():
            compute_prompt_kv(frozen, frozen.embeddings.weight[:1].detach())
    except PromptCacheUnsupportedError:
        return False
    return True


def stack_prompt_kv(prompts: Sequence[PromptKV]) -> PromptKV:
    """One row per one-row prompt, right-aligned to the longest (each distinct one copied once).

    Args:
        prompts: one-row prompt caches, one per batch row; the same object may repeat.

    Returns:
        A :class:`PromptKV` with ``len(prompts)`` rows.
    """
    first = prompts[0]
    width = max(prompt.width for prompt in prompts)
    groups: dict[int, tuple[PromptKV, list[int]]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(id(prompt), (prompt, []))[1].append(row)
    layers = []
    for layer_index, (reference, _) in enumerate(first.layers):
        keys, values = (
            reference.new_zeros(len(prompts), reference.shape[1], width, reference.shape[-1])
            for _ in range(2)
        )
        for prompt, rows in groups.values():
            prompt_keys, prompt_values = prompt.layers[layer_index]
            index = torch.tensor(rows, device=keys.device)
            keys[index, :, width - prompt.width :] = prompt_keys
            values[index, :, width - prompt.width :] = prompt_values
        layers.append((keys, values))
    lengths = torch.cat([prompt.lengths for prompt in prompts])
    return PromptKV(tuple(layers), lengths)


def prefixed_batch(
    frozen: FrozenModel,
    prefix: PromptKV | None,
    token_ids: Sequence[Sequence[int]],
    *,
    keep_all_positions: bool = False,
) -> PrefixedBatch:
    """Lay out texts behind cached prefixes.

    Args:
        frozen: the frozen model.
        prefix: one row (shared by every text) or one row per text; None runs the texts alone.
        token_ids: R non-empty token-id lists.
        keep_all_positions: give sliding-window layers a cache that keeps every position, so
            that :func:`extend_prefix` can read the cache back after the forward.

    Returns:
        The batch; run it with :func:`run`.
    """
    text_ids, text_lengths = _pad_right(token_ids, frozen.pad_id, frozen.device)
    rows, length = text_ids.shape
    text_columns = torch.arange(length, device=frozen.device).unsqueeze(0)
    text_mask = (text_columns < text_lengths.unsqueeze(1)).long()
    embeds = frozen.embed(text_ids)
    if prefix is None:
        zeros = torch.zeros(rows, dtype=torch.long, device=frozen.device)
        positions = text_columns.expand(rows, -1)
        cache = frozen.new_cache(sliding=False) if keep_all_positions else None
        return PrefixedBatch(embeds, text_mask, positions, cache, 0, zeros, text_lengths)
    if prefix.rows not in (1, rows):
        raise ValueError(f"a prefix of {prefix.rows} rows cannot serve {rows} texts")
    prefix_lengths = prefix.lengths.to(frozen.device).expand(rows)
    cache = frozen.new_cache(sliding=not keep_all_positions)
    for layer_index, (keys, values) in enumerate(prefix.layers):
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer_index)
    mask = torch.cat([_prefix_mask(prefix_lengths, prefix.width), text_mask], dim=1)
    positions = prefix_lengths.unsqueeze(1) + text_columns
    return PrefixedBatch(embeds, mask, positions, cache, 0, prefix_lengths, text_lengths)


def uncached_batch(
    frozen: FrozenModel,
    prompts: Sequence[torch.Tensor | None],
    token_ids: Sequence[Sequence[int]],
) -> PrefixedBatch:
    """The same layout with each row's prompt embeddings in ``inputs_embeds`` (no cache).

    Args:
        frozen: the frozen model.
        prompts: per row ``(n_i, H)`` prompt embeddings (the same tensor may repeat, and is then
            copied once) or None for no prompt; differentiable.
        token_ids: R non-empty token-id lists.
    """
    text_ids, text_lengths = _pad_right(token_ids, frozen.pad_id, frozen.device)
    rows, length = text_ids.shape
    device, dtype = frozen.device, frozen.dtype
    lengths = [0 if prompt is None else prompt.shape[0] for prompt in prompts]
    prefix_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
    width = max(lengths)
    text_embeds = frozen.embed(text_ids)
    prefix = text_embeds.new_zeros(rows, width, text_embeds.shape[-1])
    groups: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for row, prompt in enumerate(prompts):
        if prompt is not None:
            groups.setdefault(id(prompt), (prompt, []))[1].append(row)
    for prompt, group in groups.values():
        index = torch.tensor(group, device=device)
        prefix[index, width - prompt.shape[0] :] = prompt.to(device=device, dtype=dtype)
    columns = torch.arange(width, device=device).unsqueeze(0)
    text_columns = torch.arange(length, device=device).unsqueeze(0)
    text_mask = (text_columns < text_lengths.unsqueeze(1)).long()
    mask = torch.cat([_prefix_mask(prefix_lengths, width), text_mask], dim=1)
    prefix_positions = (columns - (width - prefix_lengths).unsqueeze(1)).clamp(min=0)
    positions = torch.cat([prefix_positions, prefix_lengths.unsqueeze(1) + text_columns], dim=1)
    embeds = torch.cat([prefix, text_embeds], dim=1)
    return PrefixedBatch(embeds, mask, positions, None, width, prefix_lengths, text_lengths)


def run(frozen: FrozenModel, batch: PrefixedBatch, cache: DynamicCache | None = None) -> torch.Tensor:
    """Final hidden states of a batch.

    Args:
        frozen: the frozen model.
        batch: from :func:`prefixed_batch` or :func:`uncached_batch`.
        cache: a cache to fill when the batch has none (generation without a prompt cache).

    Returns:
        ``(R, L, H)`` aligned with ``batch.inputs_embeds``: text token t at ``text_offset + t``.
    """
    cache = batch.cache if batch.cache is not None else cache
    return frozen.hidden_states(batch.inputs_embeds, batch.attention_mask, batch.position_ids, cache)


def extend_prefix(
    batch: PrefixedBatch, cache: DynamicCache | None = None, rows: torch.Tensor | None = None
) -> PromptKV:
    """Each row's prefix followed by its text, as a prefix for what comes next.

    Call after :func:`run` with a cache that kept every position (``prefixed_batch(...,
    keep_all_positions=True)``, or a ``new_cache(sliding=False)`` given to :func:`run` for an
    uncached batch). Differentiable.

    Args:
        batch: the batch that ran.
        cache: the cache it filled (default: ``batch.cache``).
        rows: ``(R',)`` which rows to return, in order (a row may repeat); default all.

    Returns:
        A :class:`PromptKV` with a row per selected text, of lengths ``n_i + t_i``.
    """
    cache = cache if cache is not None else batch.cache
    if cache is None:
        raise ValueError("extend_prefix needs the cache the batch ran with")
    if rows is None:
        rows = torch.arange(batch.text_lengths.shape[0], device=batch.text_lengths.device)
    rows = rows.to(batch.text_lengths.device)
    total = batch.attention_mask.shape[1]
    text_lengths = batch.text_lengths[rows]
    lengths = batch.prefix_lengths[rows] + text_lengths
    width = int(lengths.max())
    # Row i's real positions end at column W + t_i (W: the prefix width); keep the `width`
    # columns before it (those left of its own prefix are padding, masked by its length).
    prefix_width = total - (batch.inputs_embeds.shape[1] - batch.text_offset)
    start = prefix_width + text_lengths - width
    index = (start.unsqueeze(1) + torch.arange(width, device=start.device)).clamp(min=0)
    layers = []
    for layer_index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if keys.shape[-2] != total:
            raise PromptCacheUnsupportedError(
                f"layer {layer_index} of the cache kept {keys.shape[-2]} of {total} positions"
            )
        # One copy: (R', width, kv_heads, d) by advanced indexing, viewed back as (R', kv, width, d).
        row_index = rows.to(keys.device).unsqueeze(1)
        column_index = index.to(keys.device)
        layers.append(tuple(
            tensor[row_index, :, column_index].transpose(1, 2) for tensor in (keys, values)
        ))
    return PromptKV(tuple(layers), lengths)


def _plain_layers(cache: DynamicCache, length: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The cache's per-layer keys/values, checked to be plain ``(1, kv_heads, length, d)`` tensors."""
    layers = []
    for index, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.ndim != 4 or keys.shape[-2] != length:
            raise PromptCacheUnsupportedError(
                f"layer {index} of the model's cache ({type(layer).__name__}) is not a plain "
                "key/value cache; the prompt KV cache cannot be used with this model"
            )
        layers.append((keys, values))
    if not layers:
        raise PromptCacheUnsupportedError("the model filled no cache layers")
    return tuple(layers)


def _prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(R, W)`` long mask of right-aligned prefixes of the given lengths."""
    columns = torch.arange(width, device=lengths.device).unsqueeze(0)
    return (columns >= (width - lengths).unsqueeze(1)).long()


def _pad_right(
    token_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(R, T)`` ids and ``(R,)`` lengths; every row must have a token."""
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("every text must have at least one token")
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
    ids = torch.full((len(token_ids), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(token_ids):
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return ids.to(device), lengths.to(device)
