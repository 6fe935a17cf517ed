"""The training loop: one plain function, `train_loop`, for whatever a run optimises.

Prompt training (`trainer.train`) and the LoRA baseline (``benchmarks/ablations.py``) both run
it. It knows nothing of prompts or models: it gets the trainable tensors and a summed loss over
a batch of example indices (`Trainable`), the order of the batches (`BatchOrder`), an optimizer
and a scheduler, and hooks that validate, keep the best state, save resumable state and log.

One optimizer step takes ``grad_accum`` batches of the order. In a torchrun job every rank takes
the same batches and computes the loss of its shard of each; a rank backprops
``sum of its losses / the step's global count`` and the gradients are summed over ranks, so the
step equals the single-process step on the whole batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt.data import length_grouped_batches, padding_fraction
from softprompt.training import distributed
from softprompt.training.averaging import ParameterAverage
from softprompt.training.distributed import SINGLE, DistContext
from softprompt.training.state import LoopState

logger = logging.getLogger(__name__)

# The clock a time budget is measured with (read at each step's start and end).
_step_clock = time.perf_counter


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class BatchOrder:
    """Which examples each batch holds: length-grouped batches, reshuffled every epoch.

    An epoch's plan depends only on the lengths, the batch size, the seed and the epoch, so every
    rank, a resumed run and the LoRA baseline see the same batches.

    Args:
        lengths: each training example's length in tokens, ``(N,)``.
        batch_size: examples per batch (the global batch in a torchrun job).
        seed: the run's seed.
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of epoch ``epoch`` (0-based), as lists of example indices."""
        return length_grouped_batches(self.lengths, self.batch_size, seed=self.seed * 1000 + epoch)

    def padding(self, epoch: int = 0) -> float:
        """Fraction of pad tokens in the batches of epoch ``epoch``."""
        return padding_fraction(self.lengths, self.epoch(epoch))


@dataclass(frozen=True)
class Trainable:
    """What the loop optimises.

    Args:
        parameters: the tensors the optimizer updates (their gradients are summed over ranks).
        loss_sum: the summed (not mean) loss of the examples at these indices, a scalar tensor
            with a graph to ``parameters``.
        count: the number of loss terms of the examples at these indices (examples for a
            classifier, target tokens for generation); the step's loss is divided by it.
    """

    parameters: list[torch.nn.Parameter]
    loss_sum: Callable[[list[int]], torch.Tensor]
    count: Callable[[list[int]], int]


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class LoopHooks:
    """What the loop calls at evaluations, at interruptions and to log.

    Args:
        validate: scores the current state on the validation split; returns at least ``loss``
            and the settings' ``selection_metric``.
        keep_best: called when a validation is the best so far (``state.best_step`` is this step).
        save_state: saves resumable state; called after every validation and on Ctrl-C.
        log: receives each metrics record (training-loss windows and validations).
    """

    validate: Callable[[], dict[str, Any]]
    keep_best: Callable[[LoopState], None] = _nothing
    save_state: Callable[[LoopState], None] = _nothing
    log: Callable[[dict[str, Any]], None] = _nothing


@dataclass(frozen=True)
class LoopSettings:
    """How long the loop runs and how often it validates and logs.

    Args:
        total_steps: optimizer steps of the whole run (a resumed run continues up to it).
        grad_accum: batches per optimizer step.
        eval_every: steps between validations; the last step always validates.
        patience: stop after this many validations without improvement (None: never).
        log_every: steps per logged training-loss window; the last step always logs.
        selection_metric: the validation metric that picks the best state (higher is better):
            ``accuracy`` for classification, ``chrf`` for generation.
        max_grad_norm: clip the global gradient norm (over every parameter, after the sum over
            ranks) to this before each step; 0 turns clipping off.
        time_budget: seconds of optimizer steps (validation not counted) after which the step
            in progress is the last one (None: no limit); a resumed run spends what is left.
    """

    total_steps: int
    grad_accum: int = 1
    eval_every: int | None = None
    patience: int | None = None
    log_every: int = 10
    selection_metric: str = "accuracy"
    max_grad_norm: float = 0.0
    time_budget: float | None = None

    def out_of_time(self, state: LoopState) -> bool:
        """Whether the steps so far have spent the time budget."""
        return self.time_budget is not None and state.train_seconds >= self.time_budget

    def budget_progress(self, state: LoopState) -> Callable[[], float] | None:
        """What a schedule reads to decay over the time budget (`optim.make_scheduler`): a
        function giving the fraction of the budget that ``state``'s steps have spent so far;
        None without a budget."""
        if self.time_budget is None:
            return None
        budget = self.time_budget
        return lambda: min(1.0, state.train_seconds / budget)

    def expected_total(self, state: LoopState) -> int:
        """The step the run will end at: ``total_steps``, or sooner where the time budget, at the
        mean step time so far, runs out first (what the progress bar counts towards)."""
        if self.time_budget is None or state.step == 0 or state.train_seconds <= 0:
            return self.total_steps
        left = max(self.time_budget - state.train_seconds, 0.0)
        per_step = state.train_seconds / state.step
        return min(self.total_steps, state.step + math.ceil(left / per_step))


@dataclass
class LoopResult:
    """Where the loop stopped (``state``) and how many examples it trained on in this call."""

    state: LoopState
    examples_seen: int = 0


def train_loop(
    trainable: Trainable,
    order: BatchOrder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: LoopSettings,
    hooks: LoopHooks,
    state: LoopState | None = None,
    context: DistContext = SINGLE,
    average: ParameterAverage | None = None,
) -> LoopResult:
    """Optimise ``trainable`` from ``state`` (a resumed run's counters) to ``settings.total_steps``.

    With ``average`` (over ``trainable.parameters``) the loop updates it after every step, and
    validation and ``hooks.keep_best`` see the averaged tensors; ``hooks.save_state`` sees the
    trained ones.

    Raises:
        TrainingDivergedError: the loss of a step is NaN or infinite (no step is taken with it).
        KeyboardInterrupt: after ``hooks.save_state``; an unfinished step's batches are handed
            back to the state so that a resumed run redoes that step.
    """
    result = LoopResult(state or LoopState())
    state = result.state
    batches = order.epoch(state.epoch)
    throughput = _Throughput()
    step_start = None  # (step, epoch, batch_in_epoch) when the current step began
    progress = tqdm(
        total=settings.total_steps, initial=state.step, desc="train", unit="step",
        dynamic_ncols=True, disable=not context.is_main,
    )
    try:
        while state.step < settings.total_steps:
            step_start = (state.step, state.epoch, state.batch_in_epoch)
            step_batches, batches = _take_batches(order, state, batches, settings.grad_accum)
            step_began = _step_clock()
            loss = _step(trainable, step_batches, optimizer, state, context,
                         settings.max_grad_norm)
            state.train_seconds += _step_seconds(_step_clock() - step_began, settings, context)
            scheduler.step()  # after the clock: a time-budget decay reads the seconds spent
            if average is not None:
                average.update(state.step)
            examples = sum(len(batch) for batch in step_batches)
            result.examples_seen += examples
            rate = throughput.add(examples)
            progress.total = settings.expected_total(state)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.1f}")
            last = state.step == settings.total_steps or settings.out_of_time(state)
            if state.step % settings.log_every == 0 or last:
                _log_loss_window(state, hooks, scheduler.get_last_lr()[0], rate)
                throughput.reset()
            every = settings.eval_every
            due = last or (every is not None and state.step % every == 0)
            if due and _validate(state, hooks, settings, average):
                logger.info("early stop at step %d: no improvement in %d evaluations",
                            state.step, settings.patience)
                break
            if settings.out_of_time(state):
                logger.info("time budget of %.0f s spent after step %d",
                            settings.time_budget, state.step)
                break
    except KeyboardInterrupt:
        if step_start is not None and state.step == step_start[0]:
            # The step in progress did not finish: resume must redo it, so its batches are handed
            # back (its partial gradients are dropped by the next zero_grad).
            state.epoch, state.batch_in_epoch = step_start[1], step_start[2]
        hooks.save_state(state)
        raise
    finally:
        progress.close()
    return result


def _step(
    trainable: Trainable,
    batches: list[list[int]],
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    context: DistContext,
    max_grad_norm: float = 0.0,
) -> float:
    """One optimizer step on ``batches``; returns its mean loss (NaN/inf stops before the step).

    With ``max_grad_norm`` > 0 the gradient is scaled down to that global norm where it is
    longer; the norm before clipping is kept for the logged window (``grad_norm``: its maximum).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = _backward(trainable, batches, context)
    if not math.isfinite(loss):
        raise TrainingDivergedError(f"loss is {loss} at step {state.step + 1}; stopped.")
    norm = float(
        torch.nn.utils.clip_grad_norm_(trainable.parameters, max_grad_norm)
        if max_grad_norm > 0
        else torch.nn.utils.get_total_norm([p.grad for p in trainable.parameters])
    )
    if not math.isfinite(norm):
        raise TrainingDivergedError(f"gradient norm is {norm} at step {state.step + 1}; stopped.")
    state.window_grad_norm = max(state.window_grad_norm, norm)
    optimizer.step()
    state.step += 1
    state.window_loss += loss
    state.window_steps += 1
    return loss


def _step_seconds(seconds: float, settings: LoopSettings, context: DistContext) -> float:
    """The seconds a step counts against the time budget: under torchrun the ranks' mean, so
    that every rank stops at the same step (one rank stopping alone would leave the others
    waiting in the next step's gradient sum)."""
    if settings.time_budget is None or not context.enabled:
        return seconds
    total = torch.tensor([seconds], dtype=torch.float64)
    return float(distributed.all_reduce_sum(total, context)) / context.world_size


def _log_loss_window(state: LoopState, hooks: LoopHooks, lr: float, rate: float) -> None:
    """Log the mean training loss since the last logged line, and start a new window."""
    loss = state.window_loss / state.window_steps
    hooks.log({"step": state.step, "loss": loss, "lr": lr, "grad_norm": state.window_grad_norm,
               "examples_per_second": rate})
    state.window_loss, state.window_steps, state.window_grad_norm = 0.0, 0, 0.0


def _take_batches(
    order: BatchOrder, state: LoopState, batches: list[list[int]], count: int
) -> tuple[list[list[int]], list[list[int]]]:
    """The next ``count`` batches and the current epoch's plan (a new one where an epoch ends)."""
    taken = []
    for _ in range(count):
        if state.batch_in_epoch >= len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
            batches = order.epoch(state.epoch)
        taken.append(batches[state.batch_in_epoch])
        state.batch_in_epoch += 1
    return taken, batches


def _backward(trainable: Trainable, batches: list[list[int]], context: DistContext) -> float:
    """Accumulate the step's gradient on every parameter; returns the step's mean loss.

    Each rank backprops its shards' summed loss over the step's global count and the gradients
    are summed over ranks, so the gradient is the single-process mean-loss gradient.
    """
    total_count = sum(trainable.count(batch) for batch in batches)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        shard = context.shard(batch)
        if shard:  # an epoch's short last batch can leave a rank without examples
            loss = trainable.loss_sum(shard)
            (loss / total_count).backward()
            loss_sum += loss.detach().double().cpu()
    for parameter in trainable.parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        distributed.all_reduce_sum(parameter.grad, context)
    distributed.all_reduce_sum(loss_sum, context)
    return float(loss_sum) / total_count


def _validate(
    state: LoopState, hooks: LoopHooks, settings: LoopSettings, average: ParameterAverage | None
) -> bool:
    """Validate (the moving average where there is one), keep the best state, save resumable
    state; True means stop early.

    ``state.best_validation_accuracy`` holds the best value of the selection metric (the name is
    kept so that saved states resume).
    """
    metric = settings.selection_metric
    with average.applied() if average is not None else nullcontext():
        result = hooks.validate()
        value = result[metric]
        if value > state.best_validation_accuracy:  # a tie keeps the earlier best
            state.best_validation_accuracy, state.best_step = value, state.step
            state.evals_without_improvement = 0
            hooks.keep_best(state)
        else:
            state.evals_without_improvement += 1
    state.history.append({"step": state.step, f"validation_{metric}": value})
    scalars = {
        f"validation_{name}": number
        for name, number in result.items()
        if isinstance(number, float) and name != "examples"
    }
    hooks.log({"step": state.step, **scalars})
    logger.info(
        "step %d: validation %s %.4f (best %.4f at step %d)%s",
        state.step,
        metric,
        value,
        state.best_validation_accuracy,
        state.best_step,
        "".join(f", {name} {scalars[f'validation_{name}']:.4f}"
                for name in ("accuracy", "macro_f1", "chrf", "bleu")
                if f"validation_{name}" in scalars and name != metric
                and (name != "accuracy" or metric == "macro_f1")),  # a generation's is exact match
    )
    hooks.save_state(state)
    return settings.patience is not None and state.evals_without_improvement >= settings.patience


class _Throughput:
    """Training examples per second since the last reset (the progress bar and the metrics)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.examples, self.start = 0, time.perf_counter()

    def add(self, examples: int) -> float:
        self.examples += examples
        return self.examples / max(time.perf_counter() - self.start, 1e-9)
