"""Optimizers and learning-rate schedules for what a run trains (the prompt, or LoRA's matrices).

The schedules are torch's own: a linear warmup (``LinearLR`` from ``1/warmup`` to 1, so step
``s < warmup`` runs at ``(s + 1) / warmup`` of the base rate) followed, in a ``SequentialLR``,
by ``ConstantLR``, ``LinearLR`` down to 0 or ``CosineAnnealingLR`` down to 0 over the remaining
``total - warmup`` steps.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim import lr_scheduler

SCHEDULES = ("constant", "linear", "cosine")
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
) -> lr_scheduler.LRScheduler:
    """Warmup, then a constant, linear or cosine learning rate, positioned at ``start_step``.

    A resumed run rebuilds its scheduler here rather than loading a saved one: the learning rate
    is a function of the step alone, and a saved torch scheduler would pin the decay horizon of
    the first run, so a run resumed with more steps would go on at a learning rate of 0 (linear)
    or climb back up (cosine).

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is scheduled (from ``initial_lr``
            where a group has one, as a resumed optimizer's groups do).
        total_steps: optimizer steps of the whole run; the decay reaches 0 there.
        warmup_steps: steps of linear warmup (0 for none).
        schedule: ``constant``, ``linear`` or ``cosine``.
        start_step: optimizer steps already taken (a resumed run).

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not valid; allowed: {', '.join(SCHEDULES)}")
    for group in optimizer.param_groups:
        # torch's schedulers scale the current lr step by step; a resumed optimizer holds the
        # decayed one, so every build starts from the base lr and replays up to ``start_step``.
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "constant":
        decay: lr_scheduler.LRScheduler = lr_scheduler.ConstantLR(
            optimizer, factor=1.0, total_iters=0
        )
    elif schedule == "linear":
        decay = lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=0.0, total_iters=decay_steps
        )
    else:
        decay = lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)
    scheduler = decay
    if warmup_steps:
        warmup = lr_scheduler.LinearLR(
            optimizer,
            start_factor=1.0 / warmup_steps,
            end_factor=1.0,
            total_iters=max(1, warmup_steps - 1),
        )
        scheduler = lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
    with warnings.catch_warnings():
        # Replaying the schedule takes no optimizer steps, which torch would warn about.
        warnings.filterwarnings(
            "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
        )
        for _ in range(start_step):
            scheduler.step()
    return scheduler
