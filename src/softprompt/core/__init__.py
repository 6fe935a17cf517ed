"""The PEFT-compatible core: config, prompt embedding and its inits, combining a prompt with the
input, the prompt-tuned model wrapper, deep prompts (prefix tuning) and PEFT-format checkpoints.

The names import on first use (PEP 562), so that the torch-free ``core.config`` can be imported
(by the options dataclasses behind the command line) without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softprompt.core.checkpoint import PromptCheckpoint, load_prompt, save_prompt
    from softprompt.core.config import (
        PeftType,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )
    from softprompt.core.prefix import DeepPrompt, PrefixTunedModel
    from softprompt.core.prompt import PromptEmbedding
    from softprompt.core.prompt_model import PromptTunedModel, get_prompt_model

_MODULES = {
    "PromptCheckpoint": "checkpoint",
    "load_prompt": "checkpoint",
    "save_prompt": "checkpoint",
    "PeftType": "config",
    "PromptTuningConfig": "config",
    "PrefixTuningConfig": "config",
    "DeepPrompt": "prefix",
    "PrefixTunedModel": "prefix",
    "PromptTuningInit": "config",
    "TaskType": "config",
    "PromptEmbedding": "prompt",
    "PromptTunedModel": "prompt_model",
    "get_prompt_model": "prompt_model",
}

__all__ = [
    "DeepPrompt",
    "PeftType",
    "PrefixTunedModel",
    "PrefixTuningConfig",
    "PromptCheckpoint",
    "PromptEmbedding",
    "PromptTunedModel",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "get_prompt_model",
    "load_prompt",
    "save_prompt",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"softprompt.core.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
