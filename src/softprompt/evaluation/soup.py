"""`make_soup()`: the ``softprompt soup`` command and its Python API.

A soup is the element-wise mean of several prompts (model soups, Wortsman et al. 2022). Prompts
tuned from one start (TEXT init from the same instruction, or ``--init-from`` one prompt) with
other seeds or data orders tend to stay in one basin, where their mean scores about as well as
the best of them and often better than their average, while it is served at the cost of one
prompt; an ensemble costs one forward row per member. A greedy soup adds the prompts best-first
by their score on a held-out split (validation by default, never the test split one reports)
and keeps each only if the soup's score does not drop. Every score comes from
:func:`~softprompt.evaluation.evaluate.evaluate_prompt`: accuracy for a classifier, chrF for a
generation prompt.

The soup is a checkpoint like any other (PEFT's format, the first prompt's ``softprompt.json``
with a ``soup`` entry saying how it was made), so ``eval``, the Engine, the server and PEFT load it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from softprompt.core.checkpoint import PromptCheckpoint, load_prompt, save_prompt
from softprompt.evaluation.options import SoupOptions

logger = logging.getLogger(__name__)

# softprompt.json fields that every ingredient must share: the soup keeps the first one's.
SHARED_FIELDS = ("base_model", "task", "dataset", "template", "verbalizer")
SELECTION_METRICS = {"classification": "accuracy", "generation": "chrf"}


def soup_problems(checkpoints: Sequence[PromptCheckpoint]) -> list[str]:
    """One line per ingredient that does not fit the first one (kind, shape, shared fields)."""
    first, problems = checkpoints[0], []
    for checkpoint in checkpoints[1:]:
        if (type(checkpoint.config), checkpoint.weights.shape) != (type(first.config), first.weights.shape):
            problems.append(
                f"{checkpoint.path}: a {type(checkpoint.config).__name__} of shape "
                f"{tuple(checkpoint.weights.shape)}; {first.path} is a {type(first.config).__name__} "
                f"of shape {tuple(first.weights.shape)}"
            )
        problems += [
            f"{checkpoint.path}: {name} {checkpoint.metadata.get(name)!r}; {first.path} has "
            f"{first.metadata.get(name)!r}"
            for name in SHARED_FIELDS
            if checkpoint.metadata.get(name) != first.metadata.get(name)
        ]
    return problems


def save_soup(
    directory: str | Path, checkpoints: Sequence[PromptCheckpoint], about: dict[str, Any]
) -> Path:
    """Save the mean of ``checkpoints``' weights with the first one's config and metadata
    (its ``training`` summary dropped: the soup was not trained) plus ``soup``: ``about``."""
    weights = torch.stack([checkpoint.weights for checkpoint in checkpoints]).mean(dim=0)
    metadata = {key: value for key, value in checkpoints[0].metadata.items() if key != "training"}
    metadata["soup"] = about
    return save_prompt(directory, weights, checkpoints[0].config, metadata)


def make_soup(options: SoupOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Average prompts into one; with ``greedy``, only those that do not lower the soup's score.

    Args:
        options: what to average; or give its fields as keyword arguments.
        **overrides: fields applied on top of ``options``.

    Returns:
        How the soup was made: ``ingredients`` (kept, in order), ``output``; with ``greedy``
        also ``metric``, ``split``, ``scores`` (each prompt alone), ``steps`` (each trial soup's
        score and whether it was kept) and ``score`` (the final soup's). The same dict is stored
        under ``soup`` in the output's ``softprompt.json``.

    Raises:
        ValueError: fewer than two prompts, or prompts that cannot be averaged (each named).
        FileNotFoundError: a prompt directory is missing.
    """
    options = SoupOptions(**overrides) if options is None else dataclasses.replace(options, **overrides)
    checkpoints = {path: load_prompt(path) for path in options.prompts}
    problems = soup_problems(list(checkpoints.values()))
    if problems:
        raise ValueError("these prompts cannot be averaged:\n  - " + "\n  - ".join(problems))
    if not options.greedy:
        about = {"ingredients": list(options.prompts), "greedy": False, "output": options.output}
        save_soup(options.output, list(checkpoints.values()), about)
        logger.info("soup of %d prompts saved to %s", len(checkpoints), options.output)
        return about
    task = next(iter(checkpoints.values())).metadata.get("task", "classification")
    metric = SELECTION_METRICS[task]
    parent = Path(options.output).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".soup-", dir=parent))  # trial soups, removed at the end
    loaded_models: dict = {}  # the base model, loaded by the first score and reused by the rest
    try:

        def score(directory: str | Path) -> float:
            result = _evaluate(directory, options, scratch / "eval.json", loaded_models)
            return float(result[metric])

        scores = {path: score(path) for path in options.prompts}
        order = sorted(options.prompts, key=lambda path: -scores[path])  # stable: ties keep order
        kept, best, steps = [order[0]], scores[order[0]], []
        for path in order[1:]:
            trial = [*kept, path]
            save_soup(scratch / "trial", [checkpoints[item] for item in trial], {"ingredients": trial})
            value = score(scratch / "trial")
            steps.append({"ingredients": trial, metric: value, "kept": value >= best})
            logger.info("soup of %d: %s %.4f (best %.4f): %s", len(trial), metric, value, best,
                        "kept" if value >= best else "dropped")
            if value >= best:
                kept, best = trial, value
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    about = {
        "ingredients": kept, "greedy": True, "output": options.output, "metric": metric,
        "split": options.split, "max_examples": options.max_examples, "scores": scores,
        "steps": steps, "score": best,
    }
    save_soup(options.output, [checkpoints[path] for path in kept], about)
    logger.info("greedy soup of %d of %d prompts (%s %s %.4f) saved to %s", len(kept),
                len(order), options.split, metric, best, options.output)
    return about


def _evaluate(
    directory: str | Path, options: SoupOptions, output: Path, loaded_models: dict
) -> dict[str, Any]:
    """One prompt's metrics on the options' split (the evaluation of ``softprompt eval``)."""
    from softprompt.evaluation.evaluate import evaluate_prompt

    return evaluate_prompt(
        prompt=str(directory), split=options.split, max_examples=options.max_examples,
        batch_size=options.batch_size, device=options.device, dtype=options.dtype,
        output=str(output), loaded_models=loaded_models,
    )
