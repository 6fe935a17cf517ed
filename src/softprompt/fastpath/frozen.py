"""`FrozenModel`: the frozen causal LM as the fast path uses it.

Scoring, training objectives, evaluation, the Engine and decoding need the same few things from
the base model: its decoder body, its input embeddings (scaled as the model scales them, e.g.
Gemma's ``sqrt(hidden)``), final hidden states for given embeddings, masks and positions, the LM
head's rows for a few label words (or the whole vocabulary), its position limit and its pad/eos
ids. They all get them here, so the model-specific details (soft-capped logits, the cache
argument's name, sliding-window caches) are handled once.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from softprompt.core.config import check_prompt_width

logger = logging.getLogger(__name__)

FALLBACK_MAX_POSITIONS = 2048
# Texts are padded to a multiple of this many tokens where the matmul library builds a kernel per
# input shape (bf16/fp16 on CPU: oneDNN; measured on a Xeon with AMX, the first call at a new
# shape costs about 10x a cached one). Padding trades a few masked tokens for shapes that repeat.
CPU_HALF_PRECISION_GRANULE = 16
# What a failed `torch.compile` raises (tracing, the backend, a missing C++ compiler: inductor's
# errors derive from it): the body then runs eagerly, since compiling is only an optimisation.
COMPILE_ERRORS = torch._dynamo.exc.TorchDynamoException


class FrozenModel:
    """A causal LM whose weights never change, seen through the fast path's needs.

    Args:
        model: a transformers causal LM (``...ForCausalLM``). Its weights are not changed here;
            the callers freeze it (the LoRA baseline trains adapters inside it on purpose).
        tokenizer: its tokenizer, for the pad and eos ids and decoding (optional).
        length_granule: pad texts to a multiple of this many tokens; default
            :data:`CPU_HALF_PRECISION_GRANULE` for bf16/fp16 on CPU, else 1 (no rounding).
        compile: run the decoder body through ``torch.compile(dynamic=True)``. The first
            calls compile (minutes on a small CPU; later processes reuse torch's on-disk cache),
            so it pays only over thousands of steps or a long-lived server. If compilation
            fails, a warning is logged and the body runs eagerly from then on.

    Raises:
        ValueError: the model is an encoder-decoder or has no LM head.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        length_granule: int | None = None,
        compile: bool = False,
    ) -> None:
        config = model.config
        if getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__}: the fast path serves causal LMs only")
        self.model = model
        self.body: nn.Module = model.base_model
        self.embeddings: nn.Module = model.get_input_embeddings()
        self.head: nn.Module = model.get_output_embeddings()
        self.text_config = getattr(config, "get_text_config", lambda: config)()
        positions = getattr(self.text_config, "max_position_embeddings", None)
        self.max_positions = int(positions or FALLBACK_MAX_POSITIONS)
        self.softcap: float | None = getattr(self.text_config, "final_logit_softcapping", None)
        parameters = inspect.signature(self.body.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; read the name, do not assume it.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.tokenizer = tokenizer
        if length_granule is None:
            half = self.dtype in (torch.bfloat16, torch.float16)
            length_granule = CPU_HALF_PRECISION_GRANULE if half and self.device.type == "cpu" else 1
        if length_granule < 1:
            raise ValueError(f"length_granule must be >= 1, got {length_granule}")
        self.length_granule = length_granule
        self.compiled_body: Any | None = torch.compile(self.body, dynamic=True) if compile else None

    # ----------------------------------------------------------------- shape and ids
    @property
    def config(self) -> Any:
        """The model's transformers config."""
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.embeddings.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def sliding_window(self) -> int | None:
        """The window of the model's sliding-window attention layers, or None when it has none."""
        kinds = getattr(self.text_config, "layer_types", None) or ()
        window = getattr(self.text_config, "sliding_window", None)
        return int(window) if window and "sliding_attention" in kinds else None

    @property
    def pad_id(self) -> int:
        """Token used to pad text (always masked out): the tokenizer's pad, else its eos, else 0."""
        tokenizer = self.tokenizer
        for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                return value
        return 0

    @property
    def eos_ids(self) -> set[int]:
        """Tokens that end a generation: the generation config's (as ``generate``) and the tokenizer's."""
        ids: set[int] = set()
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (configured, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(item) for item in value)
        return ids

    def padded_length(self, length: int) -> int:
        """``length`` (at least 1) rounded up to a multiple of the length granule."""
        granule = self.length_granule
        return -(-max(length, 1) // granule) * granule

    def check_prompt_width(self, width: int, source: str, base_model: str | None = None) -> None:
        """Refuse a prompt tuned for another model (see :func:`check_prompt_width`)."""
        check_prompt_width(width, self.hidden_size, source, base_model)

    # ----------------------------------------------------------------- computation
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(..., T)`` ids -> ``(..., T, H)`` input embeddings, scaled as the model scales them."""
        return self.embeddings(token_ids)

    def new_cache(self, *, sliding: bool = True) -> DynamicCache:
        """An empty cache.

        Args:
            sliding: let sliding-window layers (Gemma 2/3) keep only their last window of keys,
                which saves memory in long generations. Without it every layer keeps every
                position; results are the same (masks are built by position index), and the
                cache's contents can then be read back whole.
        """
        return DynamicCache(config=self.config) if sliding else DynamicCache()

    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the last norm) of the decoder body.

        Args:
            inputs_embeds: ``(B, L, H)`` in the model's dtype.
            attention_mask: ``(B, S + L)`` 0/1 over the cached and the new positions, or None;
                or a prepared additive 4-D mask (a dict of them by attention kind).
            position_ids: ``(B, L)``.
            cache: keys/values of earlier positions (``S`` of them); the forward appends to it.

        Returns:
            ``(B, L, H)``.
        """
        arguments = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
        if cache is not None:
            arguments[self.cache_argument] = cache
        if self.compiled_body is not None:
            try:
                return self.compiled_body(**arguments).last_hidden_state
            except COMPILE_ERRORS as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                logger.warning("torch.compile failed, the model runs eagerly: %s", reason)
                self.compiled_body = None
        return self.body(**arguments).last_hidden_state

    def logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits of ``hidden`` ``(..., H)``: for ``token_ids`` ``(C,)`` only, or all words.

        Only the requested rows of the head are multiplied (a classifier never forms the
        full-vocabulary logits). Final logit soft-capping is applied where the model has it.

        Returns:
            ``(..., C)`` or ``(..., V)``, in the hidden states' dtype.
        """
        if token_ids is None:
            logits = self.head(hidden)
        else:
            bias = getattr(self.head, "bias", None)
            logits = hidden @ self.head.weight[token_ids].T.to(hidden.dtype)
            if bias is not None:
                logits = logits + bias[token_ids]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
