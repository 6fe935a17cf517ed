"""Prompt training: options, the loop, optimizers, resumable state and reports."""

from softprompt.training.options import PRESETS, TrainOptions
from softprompt.training.trainer import TrainingDivergedError, TrainResult, train

__all__ = ["PRESETS", "TrainOptions", "TrainResult", "TrainingDivergedError", "train"]
