"""A run's prompt files: the best prompt in ``OUT/prompt`` and the resumable state in ``OUT/state``.

The prompt's ``softprompt.json`` says how it was made (task, base model, dataset and its columns,
template, verbalizer, the token limit of a rendered input), so ``softprompt eval --prompt DIR``,
``predict`` and the Engine reproduce the training setting without flags. Every rank keeps the
best prompt in memory (the test split is scored with it); rank 0 alone writes files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from softprompt.core.checkpoint import load_prompt
from softprompt.core.prefix import PrefixTunedModel
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.data import Template, Verbalizer
from softprompt.training.averaging import AVERAGE_PREFIX, ParameterAverage
from softprompt.training.distributed import DistContext
from softprompt.training.options import TrainOptions
from softprompt.training.state import LoopState, load_state, save_state

logger = logging.getLogger(__name__)

PROMPT_DIR = "prompt"


def prompt_metadata(
    options: TrainOptions,
    template: Template,
    verbalizer: Verbalizer | None,
    initial_prompt: torch.Tensor,
    stop: tuple[str, ...] = (),
) -> dict[str, Any]:
    """How a prompt was made, for its ``softprompt.json``.

    Args:
        options: the run's options.
        template: the template in effect (the dataset's default when none was given).
        verbalizer: the verbalizer in effect; None for generation.
        initial_prompt: ``(n, hidden)`` prompt before training.
        stop: the generation objective's stop strings.

    Returns:
        ``task``, ``base_model``, ``dataset``, ``text_column``, ``label_column`` and
        ``target_column`` (None where the task has none), ``template``, ``verbalizer`` (label ->
        word; None for generation), ``max_length``, ``initial_prompt_norm``, ``reparameterize``
        (how the prompt was trained; it is saved folded, a plain prompt), and for generation
        ``direction`` (a translation dataset's, else None), ``max_target_length`` and ``stop``
        (the strings that end a generated text in evaluation and ``predict``).
    """
    classification = options.task_type == "classification"
    generation = (
        {}
        if classification
        else {
            "direction": options.direction,
            "max_target_length": options.max_target_length,
            "stop": list(stop),
        }
    )
    return {
        "task": options.task_type,
        "base_model": options.model,
        "dataset": options.dataset,
        "text_column": options.text_column,
        "label_column": options.label_column if classification else None,
        "target_column": None if classification else options.target_column,
        "template": template.format,
        "verbalizer": (
            {label: verbalizer.words(label)[0] for label in verbalizer.labels}
            if verbalizer
            else None
        ),
        "max_length": options.max_length,
        "initial_prompt_norm": float(initial_prompt.norm()),
        "reparameterize": (
            {"method": options.reparameterize, "bottleneck": options.residual_bottleneck}
            if options.reparameterize != "none"
            else None
        ),
        **generation,
    }


class PromptCheckpoints:
    """The best prompt (kept in memory, saved to ``OUT/prompt``) and the resumable state.

    Args:
        output_dir: the run's directory.
        model: the prompted (or prefixed) model being trained.
        metadata: `prompt_metadata` of the run; each save adds a ``training`` summary to it.
        context: this process's place in the job (rank 0 writes).
        selection_metric: the validation metric that picks the best prompt (saved with it).
    """

    def __init__(
        self,
        output_dir: Path,
        model: PromptTunedModel | PrefixTunedModel,
        metadata: dict[str, Any],
        context: DistContext,
        selection_metric: str = "accuracy",
    ) -> None:
        self.selection_metric = selection_metric
        self.output_dir = output_dir
        self.model = model
        self.metadata = metadata
        self.context = context
        self.best = model.get_prompt_embedding_to_save().cpu()

    @property
    def prompt_dir(self) -> Path:
        return self.output_dir / PROMPT_DIR

    def trained(self) -> dict[str, torch.nn.Parameter]:
        """Every trained tensor by name, in the optimizer's order: ``prompt`` (the prompt's or
        the prefix's own tensor), then a reparameterization's weights by their module names
        (``reparameterization.down.weight``, ``transform.0.weight``, ...) where one is set."""
        return {
            ("prompt" if name.startswith("embedding") else name): parameter
            for name, parameter in self.model.prompt_encoder.named_parameters()
            if parameter.requires_grad
        }

    def begin(
        self, optimizer: torch.optim.Optimizer, resume: bool, average: ParameterAverage | None = None
    ) -> LoopState:
        """The loop's starting state.

        A new run saves the initial prompt as the first best (a run stopped at once keeps it). A
        resumed run restores the prompt, the optimizer, the RNG and the moving ``average`` (where
        the run keeps one) from ``OUT/state`` and the best prompt from ``OUT/prompt``.
        """
        if not resume:
            self.save_prompt()
            return LoopState()
        saved, state = load_state(self.output_dir, optimizer)
        trained = self.trained()
        averages = {name: saved.pop(name) for name in list(saved) if name.startswith(AVERAGE_PREFIX)}
        if saved.keys() != trained.keys():
            raise ValueError(
                f"{self.output_dir}: the saved state holds {sorted(saved)}, this run trains "
                f"{sorted(trained)}"
            )
        if average is not None:
            try:
                average.load_named(list(trained), averages)
            except ValueError as error:
                raise ValueError(f"{self.output_dir}: {error}") from None
        with torch.no_grad():
            for name, parameter in trained.items():
                parameter.copy_(saved[name].to(parameter.device))
        self.best = load_prompt(self.prompt_dir).weights
        logger.info("resumed %s at step %d", self.output_dir, state.step)
        return state

    def keep_best(self, state: LoopState) -> None:
        """The current prompt is the best: keep it and save it with its validation."""
        self.best = self.model.get_prompt_embedding_to_save().cpu()
        self.save_prompt(
            {
                "step": state.step,
                f"validation_{self.selection_metric}": state.best_validation_accuracy,
            }
        )

    def save_state(
        self,
        optimizer: torch.optim.Optimizer,
        state: LoopState,
        average: ParameterAverage | None = None,
    ) -> None:
        """Write the current prompt, the optimizer, the counters and the moving average (where
        the run keeps one) to ``OUT/state`` (rank 0)."""
        if self.context.is_main:
            trained = self.trained()
            if average is not None:
                trained = {**trained, **average.named_averages(list(trained))}
            save_state(self.output_dir, trained, optimizer, state)

    def restore_best(self) -> None:
        """Put the best prompt back into the model (to score the test split with it).

        A reparameterized prompt is folded: the model then holds the plain prompt (or prefix)
        that ``OUT/prompt`` holds, and training cannot go on after this.
        """
        self.model.set_prompt_weights(self.best)

    def save_prompt(self, training: dict[str, Any] | None = None) -> None:
        """Write the model's current prompt to ``OUT/prompt`` with the metadata (rank 0)."""
        if self.context.is_main:
            meta = {**self.metadata, "training": training} if training else self.metadata
            self.model.save_pretrained(self.prompt_dir, meta)
