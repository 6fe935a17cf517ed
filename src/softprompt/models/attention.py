"""Attention in fp32 for half-precision models on CPU.

torch's CPU flash-attention kernel is slow in bf16: measured on a 2-core Xeon with AMX (torch
2.13, SmolLM2-135M, a training step at batch 8), its backward took a third of the bf16 step and
6.5x its fp32 time, while the bf16 matmuls ran 3.5x faster than fp32. Running only the attention
(queries, keys, values and mask cast up; the output cast back) in fp32 made the bf16 step 1.7x
faster, and is no less accurate. :func:`use_fp32_attention` switches a loaded model's attention
to that function, registered with transformers' attention interface.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

FP32_SDPA = "softprompt_sdpa_fp32"
_HALF = (torch.bfloat16, torch.float16)


def sdpa_in_fp32(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with its inputs in fp32 and its output in their dtype.

    Args:
        module: the attention module.
        query: ``(B, heads, Q, d)``; key, value: ``(B, kv_heads, K, d)``.
        attention_mask: a boolean or additive ``(B, 1, Q, K)`` mask, or None.
        **kwargs: passed on (scaling, dropout, is_causal, ...).

    Returns:
        ``(B, Q, heads, d)`` in the query's dtype, and None (no weights).
    """
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    output, _ = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, **kwargs
    )
    return output.to(dtype), None


AttentionInterface.register(FP32_SDPA, sdpa_in_fp32)
# Masks are built per attention implementation; without this one a custom name gets none.
AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)


def use_fp32_attention(model: Any) -> bool:
    """Run the model's attention in fp32 when it is a half-precision SDPA model on CPU.

    Returns:
        Whether the model was switched.
    """
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.dtype not in _HALF or parameter.device.type != "cpu":
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(FP32_SDPA)
    logger.debug("attention of %s runs in fp32 (half-precision model on CPU)", type(model).__name__)
    return True
