"""Shared prompt prefix: compute the prompt's keys and values once for a whole batch.

In a batch that shares one prompt (training, evaluation) every row starts with the same n
virtual tokens, so their keys and values in every layer are the same for every row. Running the
prompt once at batch size 1 and broadcasting its cache cuts the tokens each row pushes through
the model from ``n + T`` to ``T``; autograd sums the rows' gradients into the one prompt. The
result equals the plain ``[prompt, text]`` forward (positions ``n + t``, mask ones on the prompt).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from softprompt.core.prompt_model import PromptTunedModel


def _cache_keyword(body: torch.nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def layer_key_values(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)``, each ``(B, kv_heads, S, head_dim)``, from a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def prompt_key_values(model: PromptTunedModel, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the decoder body on the prompt alone (positions ``0..n-1``).

    Args:
        model: a CAUSAL_LM prompted model.
        prompt: ``(P, n, H)`` prompt embeddings in the model's dtype.

    Returns:
        Per-layer ``(keys, values)`` of shape ``(P, kv_heads, n, head_dim)``; differentiable.
    """
    body = model.base_model.base_model
    positions = torch.arange(prompt.shape[1], device=prompt.device).unsqueeze(0).expand(prompt.shape[0], -1)
    output = body(inputs_embeds=prompt, position_ids=positions, use_cache=True)
    return layer_key_values(_returned_cache(output))


def build_cache(model: PromptTunedModel, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh transformers cache holding ``key_values`` (a forward appends to it, so never reuse one)."""
    cache = DynamicCache(config=model.config)
    for layer_index, (keys, values) in enumerate(key_values):
        cache.update(keys, values, layer_index)
    return cache


def hidden_after_cache(
    model: PromptTunedModel,
    input_ids: torch.Tensor,
    cache_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """Final hidden states of right-padded ``input_ids`` that follow a cached prefix.

    Args:
        input_ids: ``(B, T)``.
        cache_mask: ``(B, S)`` mask of the cached positions.
        attention_mask: ``(B, T)`` mask of the inputs.
        position_ids: ``(B, T)``.
        cache: the prefix cache (consumed).

    Returns:
        ``(B, T, H)``.
    """
    body = model.base_model.base_model
    embeds = model.word_embeddings(input_ids)
    mask = torch.cat([cache_mask.to(attention_mask.dtype), attention_mask], dim=1)
    output = body(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **{_cache_keyword(body): cache},
    )
    return output.last_hidden_state


def shared_prefix_hidden(
    model: PromptTunedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor | None = None
) -> torch.Tensor:
    """Hidden states of a right-padded batch behind the model's prompt, prompt computed once.

    Args:
        model: a CAUSAL_LM prompted model.
        input_ids: ``(B, T)`` right-padded.
        attention_mask: ``(B, T)``.
        prompt: ``(1, n, H)`` override; defaults to the model's own prompt.

    Returns:
        ``(B, T, H)`` hidden states of the text positions.
    """
    batch = input_ids.shape[0]
    if prompt is None:
        prompt = model.get_prompt(1)[:, : model.num_virtual_tokens]
    dtype = model.word_embeddings.weight.dtype
    key_values = prompt_key_values(model, prompt.to(dtype))
    expanded = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in key_values]
    num_virtual = prompt.shape[1]
    cache_mask = torch.ones(batch, num_virtual, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(num_virtual, num_virtual + input_ids.shape[1], device=input_ids.device)
    positions = positions.unsqueeze(0).expand(batch, -1)
    return hidden_after_cache(
        model, input_ids, cache_mask, attention_mask, positions, build_cache(model, expanded)
    )
