"""Combine a soft prompt with padded inputs so that padding never changes a result.

The prompt is inserted directly before each row's first real token, whatever the padding side:
a right-padded row becomes ``[prompt, text, pad]`` (exactly PEFT's layout) and a left-padded row
``[pad, prompt, text]`` (PEFT would give ``[prompt, pad, text]``, which changes the logits:
PEFT issue #1093). Position ids count from the prompt's first token, so a left-padded row sees
the same positions as the same row unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CombinedInputs:
    """Inputs with the prompt inserted.

    Attributes:
        inputs_embeds: ``(B, n + T, H)``.
        attention_mask: ``(B, n + T)`` long, 1 on prompt and real tokens.
        position_ids: ``(B, n + T)`` long, 0 at the prompt's first token.
        labels: ``(B, n + T)`` with -100 on virtual tokens, or None.
        source_index: ``(B, n + T)``: for each combined position, the index into
            ``cat([prompt, inputs], dim=1)`` it was taken from.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    source_index: torch.Tensor


def first_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of each row's first attended token (0 for right padding)."""
    return attention_mask.long().argmax(dim=1)


def insertion_index(attention_mask: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """Where each combined position is taken from, as an index into ``cat([prompt, inputs])``.

    Args:
        attention_mask: ``(B, T)`` mask of the real inputs.
        num_virtual: n, the number of prompt rows.

    Returns:
        ``(B, n + T)`` long tensor.
    """
    batch, length = attention_mask.shape
    device = attention_mask.device
    start = first_real_index(attention_mask).unsqueeze(1)  # (B, 1)
    position = torch.arange(num_virtual + length, device=device).unsqueeze(0).expand(batch, -1)
    before = position < start
    in_prompt = (position >= start) & (position < start + num_virtual)
    # Left padding keeps its place, then the prompt, then the text (input j sits at n + j).
    return torch.where(before, position + num_virtual, torch.where(in_prompt, position - start, position))


def insert_prompt(
    prompt: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None = None,
) -> CombinedInputs:
    """Insert ``prompt`` before each row's first real token.

    Args:
        prompt: ``(B, n, H)`` prompt embeddings, already in the inputs' dtype.
        inputs_embeds: ``(B, T, H)`` token embeddings.
        attention_mask: ``(B, T)`` 0/1 mask, or None for unpadded inputs.
        labels: ``(B, T)`` token labels, or None.

    Returns:
        The combined inputs, of length ``n + T``.
    """
    batch, length, hidden = inputs_embeds.shape
    num_virtual = prompt.shape[1]
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    index = insertion_index(attention_mask, num_virtual)
    start = first_real_index(attention_mask)
    embeds = torch.cat([prompt, inputs_embeds], dim=1)
    embeds = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden))
    prompt_mask = torch.ones(batch, num_virtual, dtype=torch.long, device=device)
    mask = torch.cat([prompt_mask, attention_mask], dim=1).gather(1, index)
    # Right padding gives arange (PEFT's positions); left padding starts at 0 on the prompt.
    position_ids = (torch.arange(num_virtual + length, device=device).unsqueeze(0) - start.unsqueeze(1))
    position_ids = position_ids.clamp(min=0)
    combined_labels = None
    if labels is not None:
        ignore = torch.full((batch, num_virtual), -100, dtype=labels.dtype, device=labels.device)
        combined_labels = torch.cat([ignore, labels], dim=1).gather(1, index.to(labels.device))
    return CombinedInputs(embeds, mask, position_ids, combined_labels, index)
