"""softprompt: soft prompt tuning for frozen transformers, PEFT-compatible.

The public names are imported on first use (PEP 562), so that ``import softprompt`` and the
command line's ``--help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_CORE_NAMES = (
    "PeftType",
    "PromptCheckpoint",
    "PromptEmbedding",
    "PromptTunedModel",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "get_prompt_model",
    "load_prompt",
    "save_prompt",
)

__all__ = [*_CORE_NAMES, "__version__"]

if TYPE_CHECKING:
    from softprompt.core import (  # noqa: F401
        PeftType,
        PromptCheckpoint,
        PromptEmbedding,
        PromptTunedModel,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
        get_prompt_model,
        load_prompt,
        save_prompt,
    )


def __getattr__(name: str) -> Any:
    if name in _CORE_NAMES:
        return getattr(importlib.import_module("softprompt.core"), name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
