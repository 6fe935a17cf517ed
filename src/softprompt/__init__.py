"""softprompt: soft prompt tuning for frozen transformers, PEFT-compatible."""

from softprompt.checkpoint import PromptCheckpoint, load_prompt, save_prompt
from softprompt.config import PeftType, PromptTuningConfig, PromptTuningInit, TaskType
from softprompt.modeling import PromptTunedModel, get_prompt_model
from softprompt.prompt import PromptEmbedding

__version__ = "0.1.0"

__all__ = [
    "PeftType",
    "PromptCheckpoint",
    "PromptEmbedding",
    "PromptTunedModel",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "__version__",
    "get_prompt_model",
    "load_prompt",
    "save_prompt",
]
