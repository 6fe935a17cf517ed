"""Optimizers and learning-rate schedules for the prompt (the only trainable tensor)."""

from __future__ import annotations

import math

import torch


def make_optimizer(
    parameters: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW, or Adafactor configured as in the paper (fixed lr, no parameter scaling).

    Args:
        parameters: the prompt parameter(s).
        name: ``adamw`` or ``adafactor``.
        lr: learning rate.
        weight_decay: decoupled weight decay.
    """
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters, lr=lr, scale_parameter=False, relative_step=False,
            warmup_init=False, weight_decay=weight_decay,
        )
    raise ValueError(f"optimizer={name!r} is not valid; allowed: adamw, adafactor")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule={schedule!r} is not valid; allowed: constant, linear, cosine")


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, warmup_steps, schedule)  # validates the name up front
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule)
    )
