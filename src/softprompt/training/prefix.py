"""A run's deep prompt (``--method prefix``): its config from the options, its start from the init.

A prefix of raw keys/values trains badly from PEFT's random start (RESEARCH.md: 59.5% on
SmolLM2-135M, below zero-shot). Here it starts from the keys and values that the plain prompt
init (TEXT by default: the instruction's token embeddings; or RANDOM, SAMPLE_VOCAB,
CLASS_LABEL) produces at every layer of the frozen model, so the untrained prefix already gives
the text exactly what that prompt gives it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from softprompt.core.config import PrefixTuningConfig, PromptTuningConfig
from softprompt.core.prefix import PrefixTunedModel
from softprompt.core.prompt import initial_prompt
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import prefix_from_prompt
from softprompt.training.options import TrainOptions


def get_prefix_model(
    base: nn.Module, frozen: FrozenModel, init: PromptTuningConfig, options: TrainOptions, tokenizer: Any
) -> PrefixTunedModel:
    """Freeze ``base`` and put a new prefix in front of it, started from ``init``'s keys/values.

    Args:
        base: the frozen causal LM.
        frozen: the fast path's view of ``base``.
        init: the plain prompt whose keys/values start the prefix (its strategy, text, seed).
        options: the run's options (``num_virtual_tokens``, ``prefix_projection``,
            ``encoder_hidden_size``, ``seed``).
        tokenizer: tokenizes the init text.
    """
    config = PrefixTuningConfig(
        num_virtual_tokens=options.num_virtual_tokens,
        prefix_projection=options.prefix_projection,
        encoder_hidden_size=options.encoder_hidden_size,
        base_model_name_or_path=options.model,
    ).fill_from_model(base)
    prompt, report = initial_prompt(init, frozen.embeddings, tokenizer)
    start = prefix_from_prompt(frozen, prompt)
    init_report = {**report.to_dict(), "prompt_config": init.softprompt_fields()}
    return PrefixTunedModel(base, config, start, init_report, seed=options.seed)
