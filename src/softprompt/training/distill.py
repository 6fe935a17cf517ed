"""Start a run from saved prompts: ``--init-from`` (continue from one prompt) and ``--teacher``
(distil the label probabilities of one prompt, or of an ensemble of them, into the new one).

An ensemble of prompts classifies better than its members (Lester et al. 2021, sec. 7) but costs
one forward row per member. Distillation (Hinton et al. 2015) trains one prompt on the
ensemble's mean label probabilities over the train split, mixed with the gold labels, so a
single prompt file carries what the ensemble learned. The teachers are scored once, before
training, by the Engine, which serves them (each with its own template and verbalizer) as one
ensemble task.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from softprompt.core.checkpoint import PromptCheckpoint, atomic_write_bytes, load_prompt
from softprompt.core.config import PrefixTuningConfig
from softprompt.data import Record
from softprompt.training.distributed import SINGLE, DistContext, gather_rows
from softprompt.training.options import TrainOptions

logger = logging.getLogger(__name__)

TEACHER_FILE = "teacher_probabilities.safetensors"  # in the run directory
PROBABILITIES_KEY = "probabilities"


def saved_prompt_problems(
    flag: str, path: str, options: TrainOptions, labels: Sequence[str] | None = None
) -> list[str]:
    """What keeps the checkpoint at ``path`` from starting (``init_from``) or teaching
    (``teacher``) a run of ``options``: one line each, naming the flag and the directory.

    Args:
        flag: ``init_from`` or ``teacher``, named in each line.
        path: the prompt checkpoint directory.
        options: the run's options (model, method, length, task type).
        labels: the run's labels, which a teacher's verbalizer must have (None: not checked).
    """
    try:
        checkpoint = load_prompt(path)
    except Exception as error:  # noqa: BLE001 - reported with the run's other problems
        return [f"{flag}: {error}"]  # the error names the directory
    problems = []
    metadata = checkpoint.metadata
    base = metadata.get("base_model", checkpoint.config.base_model_name_or_path)
    if base and base != options.model:
        problems.append(f"{flag}={path!r} was tuned for model {base!r}, not {options.model!r}")
    if flag == "init_from":
        method = "prefix" if isinstance(checkpoint.config, PrefixTuningConfig) else "prompt"
        if method != options.method:
            problems.append(f"init_from={path!r} is a {method}, but method={options.method!r}")
        if checkpoint.config.num_virtual_tokens != options.num_virtual_tokens:
            problems.append(
                f"init_from={path!r} has {checkpoint.config.num_virtual_tokens} virtual tokens, "
                f"but num_virtual_tokens={options.num_virtual_tokens}"
            )
        return problems
    if metadata.get("task") != "classification":
        problems.append(f"teacher={path!r} is not a classification prompt (task "
                        f"{metadata.get('task')!r} in its softprompt.json)")
    elif labels is not None and sorted(metadata.get("verbalizer") or {}) != sorted(labels):
        problems.append(
            f"teacher={path!r} has labels {sorted(metadata.get('verbalizer') or {})}, "
            f"the dataset has {sorted(labels)}"
        )
    return problems


def start_weights(path: str | Path, expected: torch.Size) -> PromptCheckpoint:
    """The checkpoint ``--init-from`` names, checked against the new prompt's saved shape.

    Raises:
        ValueError: the weights have another shape (another model width or depth).
    """
    checkpoint = load_prompt(path)
    if checkpoint.weights.shape != expected:
        raise ValueError(
            f"init_from={str(path)!r}: weights of shape {tuple(checkpoint.weights.shape)}, "
            f"this model's prompt has {tuple(expected)}"
        )
    return checkpoint


@torch.no_grad()
def teacher_probabilities(
    model_and_tokenizer: tuple[Any, Any],
    teachers: Sequence[str],
    records: Sequence[Record],
    text_column: str,
    labels: Sequence[str],
    cache: Path | None = None,
    batch_size: int = 32,
    context: DistContext = SINGLE,
) -> tuple[torch.Tensor, float]:
    """The teachers' mean label probabilities for every record, served by the Engine.

    Under torchrun each rank scores its contiguous share of the records and the shares are
    gathered, so every rank holds the whole ``(N, C)`` table; rank 0 alone writes ``cache``.

    Args:
        model_and_tokenizer: the run's frozen model (in the run's dtype) and its tokenizer.
        teachers: prompt directories; several are one ensemble task (mean of probabilities).
        records: the examples (the train split).
        text_column: field holding each example's text.
        labels: the run's labels, in its verbalizer's order (the columns of the result).
        cache: a safetensors file (the run's ``TEACHER_FILE``): read if it holds these
            teachers' probabilities for as many records, else written after scoring, so that
            a resumed run does not score again and trains on the same targets.
        batch_size: requests per Engine call.
        context: this process's place in a distributed run (single-process by default).

    Returns:
        ``(N, C)`` fp32 probabilities in ``records`` order and ``labels`` columns, and the
        seconds the scoring took (0 when read from ``cache``).
    """
    from softprompt.inference import Engine

    key = json.dumps({"teachers": list(teachers), "labels": list(labels), "records": len(records)})
    if cache is not None and cache.exists():
        with safe_open(str(cache), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                logger.info("teachers' probabilities read from %s", cache)
                return handle.get_tensor(PROBABILITIES_KEY), 0.0
        logger.warning("%s holds other teachers' probabilities: scoring again", cache)
    started = time.perf_counter()
    engine = Engine(model_and_tokenizer=model_and_tokenizer)
    engine.add_task("teacher", list(teachers))
    share = context.shard(list(records))
    local = torch.empty(len(share), len(labels))
    starts = range(0, len(share), batch_size)
    description = f"teacher ({len(teachers)} prompt(s))"
    for start in tqdm(starts, desc=description, leave=False, disable=not context.is_main):
        batch = share[start : start + batch_size]
        results = engine.classify([("teacher", record[text_column]) for record in batch], truncate=True)
        local[start : start + len(batch)] = torch.tensor(
            [[result.probabilities[label] for label in labels] for result in results]
        )
    if context.enabled:
        logger.info("teachers: rank %d scored %d of the %d train examples (%d ranks)",
                    context.rank, len(local), len(records), context.world_size)
    probabilities = gather_rows(local, context)
    if cache is not None and context.is_main:
        atomic_write_bytes(cache, save({PROBABILITIES_KEY: probabilities}, metadata={"key": key}))
    return probabilities, time.perf_counter() - started


def distillation_summary(
    teachers: Sequence[str], weight: float, probabilities: torch.Tensor, targets: Sequence[int],
    seconds: float,
) -> dict[str, Any]:
    """What report.json says of the teachers: who, how much they weigh, how right they are."""
    right = probabilities.argmax(dim=1) == torch.tensor(list(targets))
    summary = {
        "teachers": list(teachers),
        "distill_weight": weight,
        "teacher_train_accuracy": float(right.float().mean()) if len(right) else 0.0,
        "teacher_seconds": seconds,
    }
    logger.info(
        "teachers %s: train accuracy %.4f (%d examples, %.0f s); loss = %.2f x teachers' "
        "probabilities + %.2f x gold labels", ", ".join(teachers), summary["teacher_train_accuracy"],
        len(right), seconds, weight, 1 - weight,
    )
    return summary
