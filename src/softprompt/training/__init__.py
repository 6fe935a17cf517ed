"""Prompt training: options, the loop, optimizers, resumable state and reports.

The options import at once; the trainer (torch) on first use (PEP 562), so that building the
command line does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from softprompt.training.options import PRESETS, TrainOptions

if TYPE_CHECKING:
    from softprompt.training.trainer import TrainingDivergedError, TrainResult, train

_TRAINER_NAMES = ("TrainResult", "TrainingDivergedError", "train")

__all__ = ["PRESETS", "TrainOptions", "TrainResult", "TrainingDivergedError", "train"]


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        return getattr(importlib.import_module("softprompt.training.trainer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
