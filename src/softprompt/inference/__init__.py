"""Serving prompt-tuned tasks: mixed-task batches, prompt KV caches, ensembles, generation.

See :class:`Engine`. The prompt KV cache and batch layout live in
:mod:`softprompt.fastpath.prompt_kv`, the decoding loop in :mod:`softprompt.inference.decoding`.
"""

from softprompt.inference.decoding import GenerateParams, GenerateResult
from softprompt.inference.engine import (
    ClassifyResult,
    Engine,
    InputTooLongError,
    TaskInfo,
    TaskLoadError,
    TaskNotFoundError,
)

__all__ = [
    "ClassifyResult",
    "Engine",
    "GenerateParams",
    "GenerateResult",
    "InputTooLongError",
    "TaskInfo",
    "TaskLoadError",
    "TaskNotFoundError",
]
