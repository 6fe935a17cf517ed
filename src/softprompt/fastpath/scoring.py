"""Verbalizer scoring: each label's score for texts behind a prompt, from the frozen model.

Single-token label words (the common case) need only the hidden state at each text's last
position and the label words' rows of the LM head: ``(B, H) @ (H, C)``; the full-vocabulary
logits are never formed. The scores are the label words' logits.

Multi-token label words are scored by the summed log-probability of their tokens. With the
prompt's keys/values cached, the text runs once, and the label continuations of every row run
together in one more forward behind its keys/values
(:func:`softprompt.fastpath.prompt_kv.continuation_batch`): the text is never copied per label.
With the prompt in the input instead (``prompts=``, one forward, as FSDP2-sharded training
needs), each such text is repeated once per label with the label's tokens appended.

Rows may carry different verbalizers (tasks mixed in one forward: the Engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from softprompt.data.verbalizer import TokenizedVerbalizer
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import (
    PrefixedBatch,
    PromptKV,
    continuation_batch,
    prefixed_batch,
    run,
    uncached_batch,
)


def label_scores(
    frozen: FrozenModel,
    token_ids: Sequence[Sequence[int]],
    verbalizer: TokenizedVerbalizer,
    *,
    prefix: PromptKV | None = None,
    prompts: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Label scores of texts behind a prompt, all with one verbalizer.

    Args:
        frozen: the frozen model.
        token_ids: B encoded texts (template rendered), each non-empty.
        verbalizer: the label words.
        prefix: the prompt's keys/values: one row for every text, or one row per text.
        prompts: instead of ``prefix``, per text ``(n, H)`` prompt embeddings run in the input.
            Neither: the texts alone (zero-/few-shot baselines).

    Returns:
        ``(B, C)`` fp32 unnormalised scores: label-word logits (single-token) or summed
        log-probabilities (multi-token); ``log_softmax(dim=-1)`` gives label log-probabilities.
        Differentiable with respect to the prompt.
    """
    rows = mixed_label_scores(
        frozen, token_ids, [verbalizer] * len(token_ids), prefix=prefix, prompts=prompts
    )
    return torch.stack(rows)


def mixed_label_scores(
    frozen: FrozenModel,
    token_ids: Sequence[Sequence[int]],
    verbalizers: Sequence[TokenizedVerbalizer],
    *,
    prefix: PromptKV | None = None,
    prompts: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Label scores of texts with a verbalizer each, in one text forward.

    Args:
        frozen, token_ids, prefix, prompts: as :func:`label_scores`.
        verbalizers: per text its verbalizer (the same object may repeat).

    Returns:
        Per text a ``(C_i,)`` fp32 score vector (see :func:`label_scores`).
    """
    if prefix is not None and prompts is not None:
        raise ValueError("give prefix (cached prompt) or prompts (uncached), not both")
    if prompts is not None:
        return _uncached_scores(frozen, token_ids, verbalizers, prompts)
    multi = any(not verbalizer.is_single_token for verbalizer in verbalizers)
    batch = prefixed_batch(frozen, prefix, token_ids, keep_all_positions=multi)
    last = _at(run(frozen, batch), batch.last_text_index())  # (B, H)
    scores: list[torch.Tensor | None] = [None] * len(token_ids)
    multi_groups = []
    for verbalizer, rows in _groups(verbalizers).values():
        if not verbalizer.is_single_token:
            multi_groups.append((verbalizer, rows))
            continue
        group = _first_token_logits(frozen, last[torch.tensor(rows, device=last.device)], verbalizer)
        for row, vector in zip(rows, group, strict=True):
            scores[row] = vector
    if multi_groups:
        for row, vector in _continuation_scores(frozen, batch, last, multi_groups).items():
            scores[row] = vector
    return scores


def _first_token_logits(
    frozen: FrozenModel, last: torch.Tensor, verbalizer: TokenizedVerbalizer
) -> torch.Tensor:
    """``(B, C)`` label-word logits from the last text positions' ``(B, H)`` hidden states."""
    first = torch.tensor(verbalizer.first_token_ids, device=last.device)
    return frozen.logits(last, first).float()


def _continuation_scores(
    frozen: FrozenModel,
    batch: PrefixedBatch,
    last: torch.Tensor,
    groups: list[tuple[TokenizedVerbalizer, list[int]]],
) -> dict[int, torch.Tensor]:
    """Multi-token scores: every label's continuation runs behind its text's keys/values (the
    batch ran with every position kept), all rows and labels in one forward.

    Returns:
        Per row of a multi-token group, its ``(C,)`` summed log-probabilities.
    """
    continuations: list[list[list[int]]] = [[] for _ in range(last.shape[0])]
    for verbalizer, rows in groups:
        tails = [ids[:-1] for ids in verbalizer.label_token_ids if len(ids) > 1]
        for row in rows:
            continuations[row] = tails
    scores = {}
    follows, starts = continuation_batch(frozen, batch, continuations)
    hidden = run(frozen, follows)  # (B, Q, H)
    for verbalizer, rows in groups:
        words = verbalizer.label_token_ids
        first_ids = torch.tensor([ids[0] for ids in words], device=last.device)
        index = torch.tensor(rows, device=last.device)
        first = frozen.logits(last[index]).float().log_softmax(dim=-1)[:, first_ids]  # (b, C)
        longer = [label for label, ids in enumerate(words) if len(ids) > 1]
        for position, row in enumerate(rows):
            rest = torch.zeros_like(first[position])
            if longer:
                columns = [
                    torch.arange(start, start + len(words[label]) - 1, device=hidden.device)
                    for label, start in zip(longer, starts[row], strict=True)
                ]
                selected = torch.nn.utils.rnn.pad_sequence(
                    [hidden[row, column] for column in columns], batch_first=True
                )  # (L, K - 1, H)
                summed = _summed_log_probs(frozen, selected, [words[label][1:] for label in longer])
                rest = rest.index_put((torch.tensor(longer, device=rest.device),), summed)
            scores[row] = first[position] + rest
    return scores


def _uncached_scores(
    frozen: FrozenModel,
    token_ids: Sequence[Sequence[int]],
    verbalizers: Sequence[TokenizedVerbalizer],
    prompts: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Scores in one forward with the prompts in the input; a multi-token text is repeated
    once per label with the label's tokens (all but the last) appended."""
    rows, row_prompts, first_row = [], [], []
    for text, (verbalizer, prompt) in enumerate(zip(verbalizers, prompts, strict=True)):
        words = [[]] if verbalizer.is_single_token else [ids[:-1] for ids in verbalizer.label_token_ids]
        first_row.append(len(rows))
        for tail in words:
            rows.append(list(token_ids[text]) + tail)
            row_prompts.append(prompt)
    batch = uncached_batch(frozen, row_prompts, rows)
    hidden = run(frozen, batch)
    scores: list[torch.Tensor | None] = [None] * len(token_ids)
    for verbalizer, texts in _groups(verbalizers).values():
        starts = torch.tensor([first_row[text] for text in texts], device=hidden.device)
        if verbalizer.is_single_token:
            last = _at(hidden[starts], batch.last_text_index()[starts])
            group = _first_token_logits(frozen, last, verbalizer)
        else:
            group = _repeated_text_scores(frozen, hidden, batch, starts, token_ids, texts, verbalizer)
        for text, vector in zip(texts, group, strict=True):
            scores[text] = vector
    return scores


def _repeated_text_scores(
    frozen: FrozenModel,
    hidden: torch.Tensor,
    batch: PrefixedBatch,
    starts: torch.Tensor,
    token_ids: Sequence[Sequence[int]],
    texts: list[int],
    verbalizer: TokenizedVerbalizer,
) -> torch.Tensor:
    """``(B, C)`` multi-token scores read from a text's C repeated rows (from ``starts``)."""
    words = verbalizer.label_token_ids
    longest = max(len(ids) for ids in words)
    row_index = (starts.unsqueeze(1) + torch.arange(len(words), device=starts.device)).flatten()
    ends = [batch.text_offset + len(token_ids[text]) - 1 for text in texts for _ in words]
    columns = torch.tensor([[end + k for k in range(longest)] for end in ends], device=hidden.device)
    selected = hidden[row_index.unsqueeze(1), columns.clamp(max=hidden.shape[1] - 1)]
    summed = _summed_log_probs(frozen, selected, [ids for _ in texts for ids in words])
    return summed.view(len(texts), len(words))


def _summed_log_probs(
    frozen: FrozenModel, hidden: torch.Tensor, targets: Sequence[Sequence[int]]
) -> torch.Tensor:
    """``(R,)`` sum over k of log p(targets[r][k]) from ``hidden[r, k]`` ``(R, K, H)``."""
    longest = hidden.shape[1]
    padded = torch.tensor([list(ids) + [-100] * (longest - len(ids)) for ids in targets])
    padded = padded.to(hidden.device)
    log_probs = frozen.logits(hidden).float().log_softmax(dim=-1)
    picked = log_probs.gather(-1, padded.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (padded != -100)).sum(dim=-1)


def _groups(
    verbalizers: Sequence[TokenizedVerbalizer],
) -> dict[int, tuple[TokenizedVerbalizer, list[int]]]:
    """Row indices by verbalizer (object identity), in first-seen order."""
    groups: dict[int, tuple[TokenizedVerbalizer, list[int]]] = {}
    for row, verbalizer in enumerate(verbalizers):
        groups.setdefault(id(verbalizer), (verbalizer, []))[1].append(row)
    return groups


def _at(hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(R, H)``: row r's hidden state at ``columns[r]``."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), columns]
