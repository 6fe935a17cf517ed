"""The PEFT-compatible core: config, prompt embedding and its inits, combining a prompt with the
input, the prompt-tuned model wrapper and PEFT-format checkpoints."""

from softprompt.core.checkpoint import PromptCheckpoint, load_prompt, save_prompt
from softprompt.core.config import PeftType, PromptTuningConfig, PromptTuningInit, TaskType
from softprompt.core.prompt import PromptEmbedding
from softprompt.core.prompt_model import PromptTunedModel, get_prompt_model

__all__ = [
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
]
