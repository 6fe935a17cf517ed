"""softprompt: soft prompt tuning for frozen transformers, PEFT-compatible."""

from softprompt.config import PeftType, PromptTuningConfig, PromptTuningInit, TaskType

__version__ = "0.1.0"

__all__ = ["PeftType", "PromptTuningConfig", "PromptTuningInit", "TaskType", "__version__"]
