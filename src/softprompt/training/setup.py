"""A run's setup: check the options against the data (before any model loads), pick the device,
load the frozen model, build the prompt and the objective, and encode the splits."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.core.checkpoint import load_prompt
from softprompt.core.config import PromptTuningConfig, TaskType
from softprompt.core.prefix import PrefixTunedModel
from softprompt.core.prompt import embedding_std
from softprompt.core.prompt_model import PromptTunedModel, get_prompt_model
from softprompt.core.reparameterize import ResidualReparameterization
from softprompt.data import (
    SPLITS,
    DatasetSplits,
    Record,
    Template,
    Verbalizer,
    default_instruction,
    default_template,
    load_dataset,
    resolve_verbalizer,
)
from softprompt.data.encoding import InputEncoding, input_limit, text_field_of
from softprompt.evaluation.generation import default_stop
from softprompt.evaluation.label_words import choose_label_words
from softprompt.fastpath.frozen import FrozenModel
from softprompt.models.precision import DtypeChoice, resolve_dtype
from softprompt.training import distributed
from softprompt.training.distill import (
    TEACHER_FILE,
    distillation_summary,
    saved_prompt_problems,
    start_weights,
    teacher_probabilities,
)
from softprompt.training.distributed import SINGLE, DistContext
from softprompt.training.objectives import ClassificationObjective, GenerationObjective, Objective
from softprompt.training.optim import scaled_learning_rate
from softprompt.training.options import AUTO_VERBALIZER, TrainOptions
from softprompt.training.prefix import get_prefix_model
from softprompt.training.recompute import recompute_blocks_in_backward

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the options resolve to without a model: the data, the template, the verbalizer, and
    the options with the dataset's defaults filled in (target column, direction, and the init
    text: the instruction of TEXT init and of the zero-shot baseline)."""

    splits: DatasetSplits
    template: Template
    verbalizer: Verbalizer | None  # None for generation; set by `load_run` with --verbalizer auto
    options: TrainOptions

    @property
    def instruction(self) -> str:
        """TEXT init's text and the zero-shot baseline's context (the resolved ``init_text``)."""
        return self.options.init_text or ""


@dataclass
class RunSetup:
    """The loaded pieces of a run: the prompted model, its objective and the encoded splits."""

    model: PromptTunedModel | PrefixTunedModel
    frozen: FrozenModel  # the model's frozen base, as the objective runs it
    objective: Objective
    shared_prefix: bool  # compute the prompt's keys/values once per training batch
    initial_prompt: torch.Tensor  # (n, hidden) or a prefix's (n, layers * 2 * token_dim), before any step
    train_data: Any
    validation_data: Any
    test_data: Any
    test_records: list[Record]
    dtype: DtypeChoice  # the frozen model's dtype, and why (recorded in report.json)
    label_words: dict[str, Any] | None = None  # --verbalizer auto: the search's choice and why
    learning_rate: float = 0.0  # in effect (options.learning_rate, scaled by --lr-scale)
    distillation: dict[str, Any] | None = None  # --teacher: who taught, and how well
    class_weights: dict[str, float] | None = None  # --class-weights balanced: each label's weight
    # How evaluation and teacher scoring share out among the ranks (distributed.inference_context)
    evaluation_context: DistContext = SINGLE


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a clear error."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available (use --device cpu or auto)")
    if name == "mps" and not mps:
        raise ValueError("device='mps' but MPS is not available (use --device cpu or auto)")
    return torch.device(name)


def prepare(options: TrainOptions) -> Prepared:
    """Check everything that needs no model, and report every problem in one error.

    Raises:
        ValueError: ``cannot start training:`` and one line per problem (model, dataset,
            template, verbalizer).
    """
    from softprompt.models import check_model_loadable

    problems = []
    try:
        check_model_loadable(options.model)
    except Exception as error:  # noqa: BLE001 - each problem is reported, none hidden
        problems.append(f"model={options.model!r}: {error}")
    splits = None
    try:
        splits = load_dataset(
            options.dataset,
            text_column=options.text_column,
            label_column=options.label_column if options.task_type == "classification" else None,
            target_column=options.target_column,
            direction=options.direction,
        )
    except Exception as error:  # noqa: BLE001
        problems.append(f"dataset={options.dataset!r}: {error}")
    if options.task_type == "generation" and splits is not None and not splits.target_column:
        problems.append(
            "task_type='generation' needs target_column (the field with the target text); "
            f"dataset={options.dataset!r} has no default one"
        )
    template = None
    try:
        template = (
            Template(options.template)
            if options.template
            else default_template(options.dataset, options.text_column, options.direction)
        )
    except ValueError as error:
        problems.append(f"template: {error}")
    verbalizer = None
    if splits is not None and template is not None:
        # In file order (a set would list them in a different order in every process).
        columns = list(dict.fromkeys(key for record in splits.train[:100] for key in record))
        try:
            template.validate(columns)
        except ValueError as error:
            problems.append(f"template: {error}")
        if options.task_type == "classification":
            verbalizer = _verbalizer(options, splits, problems)
    if options.init_from:
        problems += saved_prompt_problems("init_from", options.init_from, options)
    for teacher in options.teacher:
        labels = splits.labels if splits is not None else None
        problems += saved_prompt_problems("teacher", teacher, options, labels)
    if problems:
        raise ValueError("cannot start training:\n  - " + "\n  - ".join(problems))
    words = None
    if verbalizer is not None:
        words = [verbalizer.words(label)[0].strip() for label in verbalizer.labels]
    elif options.task_type == "classification":  # --verbalizer auto: its words come with the model
        words = splits.labels
    resolved = dataclasses.replace(
        options,
        target_column=splits.target_column,
        direction=splits.direction,
        init_text=options.init_text
        if options.init_text is not None  # "" stays empty (no instruction)
        else default_instruction(options.dataset, words, splits.direction),
    )
    return Prepared(splits, template, verbalizer, resolved)


def _verbalizer(
    options: TrainOptions, splits: DatasetSplits, problems: list[str]
) -> Verbalizer | None:
    """The given verbalizer, or the default one for the data's labels; problems are appended."""
    if not splits.labels:
        problems.append(
            f"dataset={options.dataset!r}: no labels in column {options.label_column!r}"
        )
        return None
    verbalizer = None
    if options.verbalizer != AUTO_VERBALIZER:  # auto: chosen with the model, in `load_run`
        try:
            verbalizer = resolve_verbalizer(options.verbalizer, splits.labels)
        except ValueError as error:
            problems.append(f"verbalizer: {error}")
            return None
    classes = verbalizer.labels if verbalizer is not None else splits.labels
    if len(classes) < 2:  # a softmax over one label word: the loss is 0, nothing would train
        problems.append(
            f"dataset={options.dataset!r}: classification needs at least 2 labels, got only "
            f"{classes[0]!r} (column {options.label_column!r} and the verbalizer)"
        )
        return None
    return verbalizer


def load_run(
    options: TrainOptions,
    prepared: Prepared,
    device: torch.device,
    context: DistContext,
    output_dir: Path | None = None,
) -> RunSetup:
    """Load the frozen model on ``device``, put the prompt on it and encode the splits
    (``output_dir``: where the teachers' probabilities are kept for a resumed run)."""
    from softprompt.models import load_model

    started = time.perf_counter()
    placement = f"cuda:{context.local_rank}" if device.type == "cuda" else str(device)
    dtype = resolve_dtype(options.dtype, placement)
    base, tokenizer = load_model(
        options.model, task_type="CAUSAL_LM", dtype=dtype.dtype, device=placement
    )
    logger.info("loaded %s in %.1f s", options.model, time.perf_counter() - started)
    train_data, validation_data, test_records = _split_records(options, prepared.splits)
    label_words = None
    if options.verbalizer == AUTO_VERBALIZER:
        prepared.verbalizer, label_words = _auto_verbalizer(
            options, prepared, train_data, FrozenModel(base, tokenizer), context
        )
    objective = make_objective(options, prepared, tokenizer)
    frozen = FrozenModel(base, tokenizer, compile=options.compile)
    continuations = objective.verbalizer.continuation_room if isinstance(objective, ClassificationObjective) else 0
    try:  # a prompt that leaves the text no position could train, but never be served
        input_limit(options.max_length, frozen.max_positions, options.num_virtual_tokens, continuations)
    except ValueError as error:
        raise ValueError(f"num_virtual_tokens={options.num_virtual_tokens}: {error}") from None
    if options.method == "prefix":
        model = get_prefix_model(base, frozen, prompt_config(options, prepared), options, tokenizer)
    else:
        model = get_prompt_model(base, prompt_config(options, prepared), tokenizer=tokenizer)
    if options.init_from:  # before a reparameterization, which then starts from these rows
        start = start_weights(options.init_from, model.get_prompt_embedding_to_save().shape)
        model.set_prompt_weights(start.weights)
        logger.info("prompt starts from %s", options.init_from)
    if options.reparameterize == "residual":  # trained through an MLP, saved folded
        model.prompt_encoder.reparameterization = ResidualReparameterization(
            model.peft_config.token_dim, options.residual_bottleneck, options.seed
        ).to(model.device)
    shared_prefix = options.prompt_prefix_shared
    if options.shard_base:
        blocks = distributed.shard_frozen_base(base, context)
        logger.info("sharded %d frozen decoder blocks over %d ranks", blocks, context.world_size)
    if options.gradient_checkpointing:
        blocks = recompute_blocks_in_backward(base)
        logger.info("gradient checkpointing: %d frozen blocks recompute their activations in "
                    "the backward pass", blocks)
    if isinstance(objective, ClassificationObjective):
        objective.shared_prefix = shared_prefix
    setup = RunSetup(
        model,
        frozen,
        objective,
        shared_prefix,
        model.get_prompt_embedding_to_save(),
        objective.encode(train_data, split="train"),
        objective.encode(validation_data, split="validation"),
        objective.encode(test_records, split="test"),
        test_records,
        dtype,
        label_words,
        learning_rate(options, model),
        evaluation_context=distributed.inference_context(context, options.shard_base),
    )
    if options.class_weights == "balanced" and isinstance(objective, ClassificationObjective):
        setup.class_weights = objective.balance_classes(setup.train_data.targets)
        logger.info("class weights (balanced over the train split): %s", ", ".join(
            f"{label}={weight:.3f}" for label, weight in setup.class_weights.items()))
    if options.teacher:
        probabilities, seconds = teacher_probabilities(
            (base, tokenizer), options.teacher, train_data, options.text_column,
            prepared.verbalizer.labels,
            cache=output_dir / TEACHER_FILE if output_dir is not None else None,
            context=setup.evaluation_context,
        )
        setup.train_data.soft_targets = probabilities
        setup.distillation = distillation_summary(
            options.teacher, options.distill_weight, probabilities, setup.train_data.targets, seconds
        )
    logger.info(
        "examples: train %d, validation %d, test %d",
        len(setup.train_data),
        len(setup.validation_data),
        len(setup.test_data),
    )
    return setup


def _auto_verbalizer(
    options: TrainOptions,
    prepared: Prepared,
    train: list[Record],
    frozen: FrozenModel,
    context: DistContext,
) -> tuple[Verbalizer, dict[str, Any] | None]:
    """``--verbalizer auto``: label words chosen on the train split with the frozen model, the
    template and the init text before it (`evaluation.label_words`); rank 0's choice is used by
    every rank. A resumed run reads the words from its saved prompt instead of searching again.
    """
    labels = prepared.splits.labels
    if options.resume:
        stored = load_prompt(Path(options.resume) / "prompt").metadata.get("verbalizer")
        return resolve_verbalizer(None, labels, stored), None
    encoding = InputEncoding(
        frozen.tokenizer,
        prepared.template,
        text_field_of(prepared.template, options.text_column),
        options.max_length,
        context=options.init_text + "\n" if options.init_text else "",
    )
    choice = choose_label_words(
        frozen, train, encoding, labels, options.label_column, seed=options.seed
    ).to_dict()
    choice = distributed.broadcast_object(choice, context)
    logger.info(
        "label words (auto, %d training examples, frozen-model accuracy %.3f): %s",
        choice["sample_size"],
        choice["sample_accuracy"],
        ", ".join(f"{label}={word!r}" for label, word in choice["words"].items()),
    )
    return resolve_verbalizer(None, labels, choice["words"]), choice


def learning_rate(options: TrainOptions, model: PromptTunedModel) -> float:
    """The run's learning rate: the given or default one, scaled to the model's embeddings with
    ``lr_scale="embedding"`` (`optim.scaled_learning_rate`)."""
    if options.lr_scale == "embedding":
        scale = embedding_std(model.word_embeddings)
        rate = scaled_learning_rate(options.learning_rate, scale)
        logger.info("learning rate %.4g (embedding std %.4f)", rate, scale)
        return rate
    return options.learning_rate


def make_objective(options: TrainOptions, prepared: Prepared, tokenizer: Any) -> Objective:
    """The run's objective: verbalizer classification or target-token generation."""
    if options.task_type == "classification":
        return ClassificationObjective(
            tokenizer,
            prepared.template,
            prepared.verbalizer.tokenize(tokenizer),
            options.label_column,
            options.max_length,
            text_column=options.text_column,
            distill_weight=options.distill_weight if options.teacher else 0.0,
        )
    splits = prepared.splits
    targets = (record[splits.target_column] for split in SPLITS for record in splits.split(split))
    return GenerationObjective(
        tokenizer,
        prepared.template,
        splits.target_column,
        options.max_length,
        options.max_target_length,
        text_column=options.text_column,
        target_language=splits.target_language,
        group_column=splits.group_column,
        stop=default_stop(targets),
    )


def prompt_config(options: TrainOptions, prepared: Prepared) -> PromptTuningConfig:
    """The prompt's PEFT config; CLASS_LABEL init starts from each label's first word."""
    labels = None
    if prepared.verbalizer is not None:
        labels = [prepared.verbalizer.words(label)[0] for label in prepared.verbalizer.labels]
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=options.num_virtual_tokens,
        prompt_tuning_init=options.init,
        prompt_tuning_init_text=prepared.instruction,
        prompt_tuning_init_labels=labels,
        tokenizer_name_or_path=options.model,
        base_model_name_or_path=options.model,
        seed=options.seed,
    )


def _split_records(
    options: TrainOptions, splits: DatasetSplits
) -> tuple[list[Record], list[Record], list[Record]]:
    """Train, validation and test records within the options' caps (validation: both caps)."""
    train = (
        splits.train[: options.max_train_examples] if options.max_train_examples else splits.train
    )
    cap = options.max_eval_examples
    validation_cap = min(filter(None, (cap, options.max_validation_examples)), default=None)
    validation = splits.validation[:validation_cap] if validation_cap else splits.validation
    test = splits.test[:cap] if cap else splits.test
    return train, validation, test


def total_steps(options: TrainOptions, train_examples: int) -> int:
    """Optimizer steps of the run: ``steps``, else ``epochs`` over the train split."""
    if options.steps is not None:
        return options.steps
    per_epoch = math.ceil(train_examples / (options.batch_size * options.grad_accum))
    return max(1, math.ceil(options.epochs * per_epoch))
