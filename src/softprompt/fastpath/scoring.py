"""Verbalizer scoring: label log-probabilities from a causal model's hidden states.

Single-token label words (the common case) need only the hidden state at each row's last real
position and the label words' rows of the LM head: ``(B, H) @ (H, C)``. The full-vocabulary
logits, by far the largest tensor of a small model's forward, are never formed.

Multi-token label words are scored by the summed log-probability of their tokens: each row is
repeated once per label with that label's tokens appended (all but the last), and the
full-vocabulary log-softmax is taken only at the few positions that predict label tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from softprompt.core.prompt_model import PromptTunedModel


@dataclass
class ScoringInputs:
    """A right-padded batch ready for scoring.

    Attributes:
        input_ids: ``(R, T)``; R = B for single-token verbalizers, B * C otherwise.
        attention_mask: ``(R, T)``.
        label_token_ids: ``(C,)`` first tokens (single-token) or None.
        target_positions: ``(R, K)`` positions (in ``input_ids``) whose next-token distribution
            predicts label token k; multi-token only.
        target_ids: ``(R, K)`` the label tokens, ``-100`` where a label is shorter than K.
        num_labels: C.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_token_ids: torch.Tensor | None
    target_positions: torch.Tensor | None
    target_ids: torch.Tensor | None
    num_labels: int

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0] if self.label_token_ids is not None else self.input_ids.shape[0] // self.num_labels

    def to(self, device: torch.device | str) -> ScoringInputs:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return ScoringInputs(
            move(self.input_ids), move(self.attention_mask), move(self.label_token_ids),
            move(self.target_positions), move(self.target_ids), self.num_labels,
        )


def _pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def build_scoring_inputs(sequences: list[list[int]], verbalizer: Any, pad_id: int) -> ScoringInputs:
    """Prepare token-id sequences (prompted text, unpadded) for label scoring.

    Args:
        sequences: B lists of token ids, each non-empty.
        verbalizer: a ``TokenizedVerbalizer`` (``label_token_ids``, ``is_single_token``).
        pad_id: padding token id.
    """
    if any(len(sequence) == 0 for sequence in sequences):
        raise ValueError("cannot score an empty input: every text must have at least one token")
    num_labels = len(verbalizer.label_token_ids)
    if verbalizer.is_single_token:
        ids, mask = _pad_right(sequences, pad_id)
        first = torch.tensor([tokens[0] for tokens in verbalizer.label_token_ids], dtype=torch.long)
        return ScoringInputs(ids, mask, first, None, None, num_labels)
    longest = max(len(tokens) for tokens in verbalizer.label_token_ids)
    rows, positions, targets = [], [], []
    for sequence in sequences:
        for tokens in verbalizer.label_token_ids:
            rows.append(sequence + tokens[:-1])
            start = len(sequence) - 1
            positions.append([start + k if k < len(tokens) else start for k in range(longest)])
            targets.append([tokens[k] if k < len(tokens) else -100 for k in range(longest)])
    ids, mask = _pad_right(rows, pad_id)
    return ScoringInputs(
        ids, mask, None, torch.tensor(positions, dtype=torch.long), torch.tensor(targets), num_labels
    )


def scores_from_hidden(
    model: PromptTunedModel, hidden: torch.Tensor, inputs: ScoringInputs, offset: torch.Tensor | int
) -> torch.Tensor:
    """Label scores from hidden states.

    Args:
        model: supplies the LM head.
        hidden: ``(R, L, H)`` hidden states where text position t sits at ``offset + t``.
        inputs: the scoring batch.
        offset: int or ``(R,)`` shift from text positions to hidden positions (the prompt length
            when the prompt is in ``hidden``; 0 when it came from a KV cache).

    Returns:
        ``(B, C)`` unnormalised label scores: label-word logits (single-token) or summed
        log-probabilities (multi-token). ``log_softmax(dim=-1)`` gives label log-probabilities.
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    offset = torch.as_tensor(offset, device=hidden.device)
    if inputs.label_token_ids is not None:
        last = inputs.attention_mask.sum(dim=1) - 1 + offset
        return model.head_logits(hidden[rows, last], inputs.label_token_ids).float()
    positions = inputs.target_positions + (offset.unsqueeze(-1) if offset.ndim else offset)
    selected = hidden[rows.unsqueeze(1), positions]  # (R, K, H)
    log_probs = model.head_logits(selected).float().log_softmax(dim=-1)
    targets = inputs.target_ids
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    summed = (picked * (targets != -100)).sum(dim=-1)
    return summed.view(-1, inputs.num_labels)


def label_scores(model: PromptTunedModel, inputs: ScoringInputs, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompted model and return ``(B, C)`` label scores (see :func:`scores_from_hidden`).

    Args:
        model: the prompted model (CAUSAL_LM).
        inputs: from :func:`build_scoring_inputs`, on the model's device.
        prompt: optional ``(R, n, H)`` prompt replacing the model's own (e.g. no prompt: n = 0).
    """
    combined = model.combine(inputs.input_ids, inputs.attention_mask, prompt=prompt)
    hidden = model.last_hidden_state(combined)
    num_virtual = combined.inputs_embeds.shape[1] - inputs.input_ids.shape[1]
    return scores_from_hidden(model, hidden, inputs, num_virtual)
