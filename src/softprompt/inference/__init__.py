"""Serving prompt-tuned tasks: mixed-task batches, prompt KV caches, ensembles, generation.

See :class:`Engine`, and :class:`Scheduler` (``engine.scheduler()``) for generation step by step. The prompt KV cache and batch layout live in
:mod:`softprompt.fastpath.prompt_kv`, the decoding loop in :mod:`softprompt.fastpath.decoding`.
The names import on first use (PEP 562), so that :mod:`softprompt.inference.options` (behind the
command line) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softprompt.fastpath.decoding import GenerateParams, GenerateResult
    from softprompt.inference.engine import (
        ClassifyResult,
        Engine,
        InputTooLongError,
        Scheduler,
        TaskInfo,
        TaskLoadError,
        TaskNotFoundError,
    )

_ENGINE = "softprompt.inference.engine"
_MODULES = {
    "GenerateParams": "softprompt.fastpath.decoding",
    "GenerateResult": "softprompt.fastpath.decoding",
    "ClassifyResult": _ENGINE,
    "Engine": _ENGINE,
    "InputTooLongError": _ENGINE,
    "Scheduler": _ENGINE,
    "TaskInfo": _ENGINE,
    "TaskLoadError": _ENGINE,
    "TaskNotFoundError": _ENGINE,
}

__all__ = [
    "ClassifyResult",
    "Engine",
    "GenerateParams",
    "GenerateResult",
    "InputTooLongError",
    "Scheduler",
    "TaskInfo",
    "TaskLoadError",
    "TaskNotFoundError",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
