"""Prompt keys and values: the one place that turns prompts into per-layer keys/values and runs
the frozen model's body after them.

A soft prompt's keys and values are the same for every text that follows it, so they are
computed once (per batch in training, with gradients; per task in serving, without) and the
body then runs on the text tokens only. The same move serves any shared prefix: a text scored
against several multi-token label words is run once, and the label continuations run behind its
keys/values (:func:`continuation_batch`); the tokens every text of a split starts with (a
baseline's few-shot context, a template's first words) run once behind the prompt
(:func:`share_leading_tokens`).

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

A deep prompt (prefix tuning, :class:`~softprompt.core.prefix.DeepPrompt`) *is* keys and values:
:func:`compute_prompt_kv` only reshapes it into the same :class:`PromptKV`, so everything that takes
a prompt's keys/values (training objectives, scoring, decoding, the Engine's mixed batches) takes a
prefix unchanged. Its keys carry no rotary embedding and the text still counts from ``n_i``, which
is what PEFT does with a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from softprompt.core.prefix import DeepPrompt, flatten_layers
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


@dataclass
class PrefixedBatch:
    """Texts behind their prefixes, padded in the layout of the module docstring.

    Attributes:
        inputs_embeds: ``(R, L, H)``; L = T with a cache (text only), W + T without.
        attention_mask: ``(R, W + T)`` long over prefix and text (``(R, T)`` without a prefix);
            for continuations (:func:`continuation_batch`) an additive 4-D mask, or one per
            attention kind (``{"full_attention": ..., "sliding_attention": ...}``).
        position_ids: ``(R, L)`` long.
        cache: the prefixes' keys/values (W positions); a forward appends to it, so it serves
            one forward only. None when the prefixes are in ``inputs_embeds`` or absent.
        text_offset: column of text token 0 in ``inputs_embeds`` (and in the hidden states).
        prefix_lengths: ``(R,)`` long, n_i.
        text_lengths: ``(R,)`` long, t_i.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | dict[str, torch.Tensor]
    position_ids: torch.Tensor
    cache: DynamicCache | None
    text_offset: int
    prefix_lengths: torch.Tensor
    text_lengths: torch.Tensor

    def last_text_index(self) -> torch.Tensor:
        """``(R,)`` column of each row's last text token in the hidden states."""
        return self.text_offset + self.text_lengths - 1


def compute_prompt_kv(frozen: FrozenModel, prompt: torch.Tensor | DeepPrompt) -> PromptKV:
    """Run the body on a prompt alone (positions ``0 .. n - 1``) and keep its keys and values.

    Differentiable with respect to ``prompt`` when gradients are enabled (training); call it
    under ``torch.no_grad()`` to cache a prompt for serving.

    Args:
        frozen: the frozen model.
        prompt: ``(n, H)`` prompt embeddings (any float dtype; cast to the model's), or a deep
            prompt, whose keys and values are taken as they are.

    Returns:
        A one-row :class:`PromptKV`.

    Raises:
        PromptCacheUnsupportedError: the model's cache holds something other than plain keys
            and values for every layer.
    """
    length = prompt.shape[0]
    device = frozen.device
    if isinstance(prompt, DeepPrompt):
        layers = tuple(
            (keys.to(device, frozen.dtype), values.to(device, frozen.dtype)) for keys, values in prompt.layers()
        )
        return PromptKV(layers, torch.tensor([length], device=device))
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


def prefix_from_prompt(frozen: FrozenModel, prompt: torch.Tensor) -> torch.Tensor:
    """The keys and values a plain prompt produces at every layer, as a prefix to start from.

    Args:
        frozen: the frozen model.
        prompt: ``(n, H)`` prompt embeddings (e.g. the TEXT init's token embeddings).

    Returns:
        ``(n, num_layers * 2 * kv_heads * head_dim)`` fp32 in PEFT's layout (see
        :mod:`softprompt.core.prefix`); as a prefix it gives the text exactly what the prompt did.
    """
    with torch.no_grad():
        return flatten_layers(compute_prompt_kv(frozen, prompt).layers).cpu()


def check_prompt(
    frozen: FrozenModel, prompt: torch.Tensor | DeepPrompt, source: str, base_model: str | None = None
) -> None:
    """Refuse a prompt the model cannot take: a plain prompt of another width, or a prefix whose
    layers, key/value heads or head size are not the model's.

    Raises:
        ValueError: naming ``source`` (a checkpoint directory) and, if known, ``base_model``.
    """
    if not isinstance(prompt, DeepPrompt):
        frozen.check_prompt_width(prompt.shape[1], source, base_model)
        return
    with torch.no_grad():
        reference = compute_prompt_kv(frozen, frozen.embeddings.weight[:1].detach())
    keys = reference.layers[0][0]
    expected = (len(reference.layers), keys.shape[1], keys.shape[-1])
    found = (prompt.num_layers, prompt.kv_heads, prompt.head_dim)
    if found != expected:
        tuned_for = f"; it was tuned for another model ({base_model})" if base_model else ""
        raise ValueError(
            f"{source}: the prefix has (layers, key/value heads, head_dim) = {found} but the model "
            f"has {expected}{tuned_for}"
        )


def common_leading_tokens(token_ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one of its own."""
    if not token_ids:
        return 0
    first = token_ids[0]
    shared = min(len(ids) for ids in token_ids) - 1
    for ids in token_ids[1:]:
        matched = 0
        while matched < shared and ids[matched] == first[matched]:
            matched += 1
        shared = matched
    return max(shared, 0)


def extend_prompt_kv(frozen: FrozenModel, prefix: PromptKV | None, token_ids: Sequence[int]) -> PromptKV:
    """Keys and values of ``prefix`` followed by ``token_ids``, run once behind it.

    A text behind the result sees what it sees behind ``prefix`` with ``token_ids`` at its start:
    the tokens take the positions after the prefix's, and their keys/values are the ones that
    forward computes.

    Args:
        frozen: the frozen model.
        prefix: a one-row prefix (a prompt's or a deep prompt's keys/values), or None.
        token_ids: the non-empty tokens to append.

    Returns:
        A one-row :class:`PromptKV`, ``len(token_ids)`` wider than ``prefix``.

    Raises:
        PromptCacheUnsupportedError: the model's cache is not plain keys/values.
    """
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=frozen.device)
    if prefix is None:
        return compute_prompt_kv(frozen, frozen.embed(ids))
    if prefix.rows != 1:
        raise ValueError(f"only a one-row prefix can be extended, got {prefix.rows} rows")
    batch = prefixed_batch(frozen, prefix, [ids.tolist()], keep_all_positions=True)
    run(frozen, batch)  # appends the tokens (and their length padding) to batch.cache
    padded = prefix.width + batch.inputs_embeds.shape[1]
    length = prefix.width + len(ids)
    layers = tuple(
        (keys[:, :, :length], values[:, :, :length]) for keys, values in _plain_layers(batch.cache, padded)
    )
    return PromptKV(layers, prefix.lengths + len(ids))


def share_leading_tokens(
    frozen: FrozenModel, prefix: PromptKV | None, token_ids: Sequence[Sequence[int]]
) -> tuple[PromptKV | None, list[Sequence[int]]]:
    """Move the tokens every text starts with into the prefix, so that they run once.

    A split's texts often share their first tokens: a zero- or few-shot context, a template's
    first words. Scored behind the extended prefix, each text runs only its own tokens, with the
    same result (up to rounding). Where nothing is shared, or the model's cache cannot hold the
    tokens, the prefix and texts come back unchanged.

    Args:
        frozen: the frozen model.
        prefix: a one-row prefix, or None.
        token_ids: the texts.

    Returns:
        The prefix, and every text less the shared tokens.
    """
    shared = common_leading_tokens(token_ids)
    if not shared or (prefix is not None and prefix.rows != 1):
        return prefix, list(token_ids)
    try:
        extended = extend_prompt_kv(frozen, prefix, token_ids[0][:shared])
    except PromptCacheUnsupportedError:
        return prefix, list(token_ids)
    return extended, [ids[shared:] for ids in token_ids]


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
            that :func:`continuation_batch` can follow the text.

    Returns:
        The batch; run it with :func:`run`.
    """
    text_ids, text_lengths = _pad_right(token_ids, frozen)
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
    if any(isinstance(prompt, DeepPrompt) for prompt in prompts):
        raise ValueError("a deep prompt (prefix) is keys/values, not input embeddings: use prefixed_batch")
    text_ids, text_lengths = _pad_right(token_ids, frozen)
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


def continuation_batch(
    frozen: FrozenModel, batch: PrefixedBatch, continuations: Sequence[Sequence[Sequence[int]]]
) -> tuple[PrefixedBatch, list[list[int]]]:
    """Several short continuations after each row's text, run in one forward behind its keys/values.

    The continuations of a row are packed side by side; each sees the row's prefix and text and
    its own earlier tokens, never the other continuations, and its positions follow the text
    (``n_i + t_i + k``), so it computes what ``[prefix, text, continuation]`` alone would. The
    batch's cache is reused as it is (the continuation forward appends to it): the text's
    keys/values are neither recomputed nor copied. Sliding-window layers get their own mask,
    windowed by position.

    Args:
        frozen: the frozen model.
        batch: a batch built with ``keep_all_positions=True`` that has run (:func:`run`).
        continuations: per row, its continuations (non-empty token lists; a row may have none).

    Returns:
        The continuation batch (run it with :func:`run`; ``text_offset`` 0) and, per row, the
        column of each continuation's first token in its hidden states.
    """
    cached = batch.attention_mask.shape[1]
    if batch.cache is None or batch.cache.get_seq_length() != cached:
        raise ValueError("continuation_batch needs a batch that ran with every position kept")
    rows = len(continuations)
    width = frozen.padded_length(max(sum(len(tokens) for tokens in row) for row in continuations))
    ids = torch.full((rows, width), frozen.pad_id, dtype=torch.long)
    owner = torch.full((rows, width), -1, dtype=torch.long)  # which continuation fills a column
    step = torch.zeros(rows, width, dtype=torch.long)  # a token's index in its continuation
    starts: list[list[int]] = []
    for row, sequences in enumerate(continuations):
        column, row_starts = 0, []
        for index, tokens in enumerate(sequences):
            row_starts.append(column)
            span = slice(column, column + len(tokens))
            ids[row, span] = torch.as_tensor(tokens, dtype=torch.long)
            owner[row, span], step[row, span] = index, torch.arange(len(tokens))
            column += len(tokens)
        starts.append(row_starts)
    device = frozen.device
    ids, owner, step = ids.to(device), owner.to(device), step.to(device)
    positions = (batch.prefix_lengths + batch.text_lengths).unsqueeze(1) + step  # (R, Q)
    same = (owner.unsqueeze(2) == owner.unsqueeze(1)) & (step.unsqueeze(2) >= step.unsqueeze(1))
    seen = batch.attention_mask.bool().unsqueeze(1).expand(-1, width, -1)
    allowed = torch.cat([seen, same], dim=2)  # (R, Q, cached + Q)
    key_positions = torch.cat([_cached_positions(batch), positions], dim=1)
    mask = position_mask(frozen, allowed, positions, key_positions)
    embeds = frozen.embed(ids)
    lengths = torch.tensor([sum(map(len, row)) for row in continuations], device=device)
    follows = PrefixedBatch(embeds, mask, positions, batch.cache, 0, batch.prefix_lengths, lengths)
    return follows, starts


def position_mask(
    frozen: FrozenModel,
    allowed: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive attention masks from which keys each query may see, windowed by position.

    Args:
        frozen: the frozen model (its dtype and sliding window).
        allowed: ``(R, Q, K)`` bool, the keys each query sees in full-attention layers.
        query_positions: ``(R, Q)`` long position of each query.
        key_positions: ``(R, K)`` long position of each key.

    Returns:
        A ``(R, 1, Q, K)`` mask; for a model with sliding-window layers, one per attention kind
        (``{"full_attention": ..., "sliding_attention": ...}``), the latter also hiding keys a
        window or more behind the query.
    """
    mask = _additive(allowed, frozen.dtype)
    window = frozen.sliding_window
    if window is None:
        return mask
    near = (query_positions.unsqueeze(2) - key_positions.unsqueeze(1)) < window
    return {"full_attention": mask, "sliding_attention": _additive(allowed & near, frozen.dtype)}


def _cached_positions(batch: PrefixedBatch) -> torch.Tensor:
    """``(R, W + T)`` position of each cached column (padding columns get harmless values)."""
    total = batch.attention_mask.shape[1]
    width = total - (batch.inputs_embeds.shape[1] - batch.text_offset)
    columns = torch.arange(total, device=batch.prefix_lengths.device).unsqueeze(0)
    return columns - width + batch.prefix_lengths.unsqueeze(1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``(R, 1, Q, K)`` additive attention mask: 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


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


def _pad_right(token_ids: Sequence[Sequence[int]], frozen: FrozenModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(R, T)`` ids (T: the longest, rounded up to the model's length granule)
    and ``(R,)`` lengths; every row must have a token."""
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("every text must have at least one token")
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
    ids = torch.full((len(token_ids), frozen.padded_length(int(lengths.max()))), frozen.pad_id)
    for row, sequence in enumerate(token_ids):
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return ids.to(frozen.device), lengths.to(frozen.device)
