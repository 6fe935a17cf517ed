"""Optimizers and learning-rate schedules for what a run trains (the prompt, or LoRA's matrices).

A schedule is a linear warmup (step ``s < warmup`` runs at ``(s + 1) / warmup`` of the base rate)
followed by a constant rate, or a linear or cosine decay to 0 at the end of the run. Where the
run has a time budget, its end is whichever comes first, the last step or the budget: the decay
follows the larger of the two fractions spent, so a run is not cut off at full learning rate
(the budget-aware schedules of Li et al., "Budgeted Training", ICLR 2020).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.optim import lr_scheduler

from softprompt.training.options import SCHEDULES

# The std of SmolLM2-135M's embedding entries (core.prompt.embedding_std), the model the default
# learning rates were tuned on (README, Results).
REFERENCE_EMBEDDING_STD = 0.135


def scaled_learning_rate(lr: float, embedding_std: float) -> float:
    """``lr`` carried over to a model whose embedding entries have std ``embedding_std``.

    Adam-type optimizers move each entry by about ``lr`` per step whatever the gradient's size,
    so the same ``lr`` changes a prompt on a larger scale relatively less (Gemma 3 scales its
    embeddings by ``sqrt(hidden)``: std 1.03 for Gemma-3-270M, 7.6 times SmolLM2's). Scaling
    ``lr`` by ``embedding_std / REFERENCE_EMBEDDING_STD`` keeps the relative step of SmolLM2.
    """
    return lr * embedding_std / REFERENCE_EMBEDDING_STD


def make_optimizer(
    parameters: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW, or Adafactor configured as in the paper (fixed lr, no parameter scaling).

    Args:
        parameters: the trainable tensors (the prompt, ``(n, hidden)``).
        name: ``adamw`` or ``adafactor``.
        lr: learning rate.
        weight_decay: decoupled weight decay.
    """
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=weight_decay,
        )
    raise ValueError(f"optimizer={name!r} is not valid; allowed: adamw, adafactor")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    start_step: int = 0,
    budget_spent: Callable[[], float] | None = None,
) -> lr_scheduler.LRScheduler:
    """Warmup, then a constant, linear or cosine learning rate, positioned at ``start_step``.

    A resumed run rebuilds its scheduler here rather than loading a saved one: the learning rate
    is a function of the step (and of the time budget spent) alone, and a saved torch scheduler
    would pin the decay horizon of the first run, so a run resumed with more steps would go on
    at a learning rate of 0 (linear) or climb back up (cosine).

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is scheduled (from ``initial_lr``
            where a group has one, as a resumed optimizer's groups do).
        total_steps: optimizer steps of the whole run; the decay reaches 0 there.
        warmup_steps: steps of linear warmup (0 for none).
        schedule: ``constant``, ``linear`` or ``cosine``.
        start_step: optimizer steps already taken (a resumed run).
        budget_spent: where the run has a time budget, the fraction of it spent so far (read at
            each step); the decay then reaches 0 at the budget's end if that comes first.

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not valid; allowed: {', '.join(SCHEDULES)}")
    for group in optimizer.param_groups:
        # A resumed optimizer holds the decayed lr: every build starts from the base one.
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / decay_steps
        if budget_spent is not None:
            progress = max(progress, budget_spent())
        return decay_factor(schedule, min(progress, 1.0))

    scheduler = lr_scheduler.LambdaLR(optimizer, factor)
    with warnings.catch_warnings():
        # Replaying the schedule takes no optimizer steps, which torch would warn about.
        warnings.filterwarnings(
            "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
        )
        for _ in range(start_step):
            scheduler.step()
    return scheduler


def decay_factor(schedule: str, progress: float) -> float:
    """The fraction of the base learning rate ``schedule`` runs at after warmup, ``progress``
    (0 to 1) of the way to the run's end."""
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
