"""`train()`: the main job. One function is the Python API and the ``softprompt train`` command.

Flow: validate options and data (before the model loads; `setup.prepare`) -> load the frozen
model, the prompt and the objective (`setup.load_run`) -> baselines (zero-shot, initial prompt)
-> optimise the prompt with `loop.train_loop` on length-grouped batches, with periodic
validation, best-checkpoint saving and early stopping (`checkpoints`) -> test the best prompt ->
``report.json``, ``metrics.jsonl``, ``curves.png`` (`report`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from softprompt.core.checkpoint import WEIGHTS_NAME, atomic_write_json
from softprompt.training import distributed
from softprompt.training.averaging import ParameterAverage
from softprompt.training.checkpoints import PromptCheckpoints, prompt_metadata
from softprompt.training.loop import (
    BatchOrder,
    LoopHooks,
    LoopResult,
    LoopSettings,
    Trainable,
    TrainingDivergedError,
    train_loop,
)
from softprompt.training.optim import make_optimizer, make_scheduler
from softprompt.training.options import OPTIONS_FILE, TrainOptions
from softprompt.training.report import MetricsLog, build_report, plot_curves, training_summary
from softprompt.training.setup import (
    Prepared,
    RunSetup,
    load_run,
    prepare,
    resolve_device,
    total_steps,
)

logger = logging.getLogger(__name__)

# Options a resumed run may set differently from the saved run (the rest define the run).
RESUME_CHANGEABLE = (
    "steps",
    "epochs",
    "eval_every",
    "patience",
    "baselines",
    "init_baseline",
    "device",
    "dist_timeout",
)

__all__ = ["TrainResult", "TrainingDivergedError", "train"]


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its report."""

    output_dir: Path
    report: dict[str, Any]


def _default_output_dir(options: TrainOptions, claim: bool) -> Path:
    """``runs/<dataset>-<model>-<time>``, with ``-2``, ``-3``... for runs started in the same
    second; ``claim`` creates it (atomically, so two processes never share one)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dataset = (
        Path(options.dataset).stem
        if "/" in options.dataset or "." in options.dataset
        else options.dataset
    )
    model = Path(options.model).stem if "/" in options.model else options.model
    name, copy = f"{dataset}-{model}-{stamp}", 1
    while True:
        path = Path("runs") / (name if copy == 1 else f"{name}-{copy}")
        if not claim:
            return path
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            copy += 1


def train(
    options: TrainOptions | None = None, *, preset: str | None = None, **overrides: Any
) -> TrainResult:
    """Tune a soft prompt on a frozen model.

    Args:
        options: the run's options; or give them as keyword arguments (``num_virtual_tokens=20``).
        preset: without ``options``, a named option set (``PRESETS``) or an earlier run's
            ``options.json``, under the keyword options.
        **overrides: options applied on top of ``options`` (or of the preset); ``epochs``
            without ``steps`` unsets the steps, so the epochs set the run's length.

    Returns:
        The output directory and the report (also in ``OUT/report.json``).

    Raises:
        ValueError: bad options or data, all problems listed at once, before the model loads.
        TrainingDivergedError: NaN/inf loss; the best checkpoint so far stays in ``OUT/prompt``.
    """
    if overrides.get("epochs") is not None and "steps" not in overrides:
        overrides["steps"] = None  # epochs given alone set the run's length, not the default steps
    # The options the caller set (the rest are defaults): on resume, only these override the
    # saved run.
    given = set(overrides) | (options.non_defaults() if options is not None else set())
    if options is None:
        options = TrainOptions.from_preset(preset, **overrides)
    elif overrides:
        options = TrainOptions.from_dict({**options.to_dict(), **overrides})
    if options.resume:
        options = _resumed_options(options, given)
    distributed.check_batch_divisible(options.batch_size, distributed.world_from_environment())
    prepared = prepare(options)
    options = prepared.options  # the dataset's defaults filled in (target column, direction, ...)
    device = resolve_device(options.device)
    context = distributed.init_distributed(device, options.dist_timeout)
    try:
        output_dir = (
            Path(options.output_dir)
            if options.output_dir
            else _default_output_dir(options, claim=context.is_main)
        )
        output_dir = Path(distributed.broadcast_object(str(output_dir), context))
        if context.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(output_dir / OPTIONS_FILE, options.to_dict())
        distributed.barrier(context)
        result = _run(options, prepared, output_dir, device, context)
        # Every rank's collectives (FSDP2's prefetched gathers too) finish before any rank takes
        # the group down: a rank that destroyed it early aborted once at exit ("terminate called
        # without an active exception") with --shard-base.
        distributed.barrier(context)
        return result
    finally:
        distributed.shutdown(context)


def _resumed_options(options: TrainOptions, given: set[str]) -> TrainOptions:
    """The saved run's options, with the given ones that may change on resume (e.g. more steps).

    The prompt and optimizer state are saved whole, so the world size may change on resume too.
    Any other given option that differs from the saved run is an error rather than being ignored.
    """
    saved = json.loads((Path(options.resume) / OPTIONS_FILE).read_text())
    changed = {
        name: getattr(options, name)
        for name in sorted(given - {"resume", "output_dir"})
        if name in saved and getattr(options, name) != saved[name]
    }
    fixed = [name for name in changed if name not in RESUME_CHANGEABLE]
    if fixed:
        raise ValueError(
            f"resume={options.resume!r}: cannot change "
            + ", ".join(
                f"{name} (saved {saved[name]!r}, given {changed[name]!r})" for name in fixed
            )
            + f" when resuming; only {', '.join(RESUME_CHANGEABLE)} may change"
        )
    return TrainOptions.from_dict(
        {**saved, **changed, "resume": options.resume, "output_dir": options.resume}
    )


def _run(
    options: TrainOptions,
    prepared: Prepared,
    output_dir: Path,
    device: torch.device,
    context: distributed.DistContext,
) -> TrainResult:
    """Load, measure the baselines, train, test the best prompt, write the outputs."""
    started = time.perf_counter()
    run = load_run(options, prepared, device, context, output_dir)
    metrics = (
        MetricsLog(output_dir / "metrics.jsonl", append=bool(options.resume))
        if context.is_main
        else None
    )
    baselines = {}
    if options.baselines and not options.resume:
        baselines = _baselines(prepared.instruction, run, options.init_baseline)
    metric = run.objective.selection_metric
    metadata = prompt_metadata(
        options, prepared.template, prepared.verbalizer, run.initial_prompt,
        getattr(run.objective, "stop", ()),
    )
    checkpoints = PromptCheckpoints(output_dir, run.model, metadata, context, metric)
    trained_parameters = sum(tensor.numel() for tensor in checkpoints.trained().values())
    train_started = time.perf_counter()
    loop, padding = _optimise(options, run, checkpoints, metrics, context)
    train_seconds = time.perf_counter() - train_started
    checkpoints.restore_best()
    test = run.objective.evaluate(
        run.frozen, run.model.prompt, run.test_data, description="test",
        context=run.evaluation_context,
    )
    logger.info(
        "test %s of the best prompt (step %d): %s",
        "/".join(_reported_metrics(metric, test)),
        loop.state.best_step,
        "/".join(f"{test[name]:.4f}" for name in _reported_metrics(metric, test)),
    )
    if test.get("per_group"):
        logger.info("test by %s: %s", test["group_column"], "; ".join(
            f"{group}: chrF {scores['chrf']:.2f} BLEU {scores['bleu']:.2f} (n={scores['examples']})"
            for group, scores in test["per_group"].items()
        ))
    report = build_report(
        options,
        run.model,
        run.initial_prompt,
        loop,
        test,
        baselines=baselines,
        train_examples=len(run.train_data),
        padding=padding,
        seconds=(time.perf_counter() - started, train_seconds),
        device=device,
        world_size=context.world_size,
        dtype=run.dtype,
        selection_metric=metric,
        trained_parameters=trained_parameters,
        learning_rate=run.learning_rate,
        verbalizer=metadata["verbalizer"],
        label_words=run.label_words,
        distillation=run.distillation,
        class_weights=run.class_weights,
    )
    if context.is_main:
        # The best prompt is on disk already (saved when it was found): its weights file's size.
        report["adapter_bytes"] = (checkpoints.prompt_dir / WEIGHTS_NAME).stat().st_size
        atomic_write_json(output_dir / "report.json", report)
        checkpoints.save_prompt(training_summary(report))
        plot_curves(
            metrics.path, output_dir / "curves.png", title=f"{options.dataset} / {options.model}",
            metric=run.objective.selection_metric,
        )
        logger.info("wrote %s", output_dir)
    return TrainResult(output_dir, report)


def _reported_metrics(selection_metric: str, result: dict[str, Any]) -> list[str]:
    """The metrics logged and reported for a split: the selection metric first, then a
    classifier's accuracy and macro-F1 (a generation's ``accuracy`` is exact match: left out)."""
    classifier = ["accuracy", "macro_f1"] if "macro_f1" in result else []
    return list(dict.fromkeys([selection_metric, *classifier]))


def _baselines(instruction: str, run: RunSetup, with_initial: bool) -> dict[str, float]:
    """The test selection metric (accuracy, or chrF for generation), and macro-F1 for a
    classifier, without a prompt (the instruction leads the input) and, if ``with_initial``,
    with the initial prompt: ``zero_shot_<metric>``, ``init_<metric>``."""
    lead = instruction + "\n" if instruction else ""
    instructed = run.objective.encode(run.test_records, context=lead, split="test")
    results = {"zero_shot": run.objective.evaluate(
        run.frozen, None, instructed, description="zero-shot", context=run.evaluation_context
    )}
    if with_initial:
        results["init"] = run.objective.evaluate(
            run.frozen, run.model.prompt, run.test_data, description="initial prompt",
            context=run.evaluation_context,
        )
    names = _reported_metrics(run.objective.selection_metric, results["zero_shot"])
    labels = {"zero_shot": "zero-shot", "init": "initial prompt"}
    logger.info("test %s: %s", "/".join(names), ", ".join(
        f"{labels[kind]} " + "/".join(f"{result[name]:.4f}" for name in names)
        for kind, result in results.items()
    ))
    return {f"{kind}_{name}": result[name] for kind, result in results.items() for name in names}


def _optimise(
    options: TrainOptions,
    run: RunSetup,
    checkpoints: PromptCheckpoints,
    metrics: MetricsLog | None,
    context: distributed.DistContext,
) -> tuple[LoopResult, float]:
    """Train the prompt from scratch or from the saved state; returns the loop's result and the
    padding fraction of the training batches."""
    parameters = list(checkpoints.trained().values())
    optimizer = make_optimizer(
        parameters, options.optimizer, run.learning_rate, options.weight_decay
    )
    average = ParameterAverage(parameters, options.ema_decay) if options.ema_decay else None
    state = checkpoints.begin(optimizer, resume=bool(options.resume), average=average)
    steps = total_steps(options, len(run.train_data))
    settings = LoopSettings(
        steps,
        options.grad_accum,
        options.eval_every,
        options.patience,
        selection_metric=run.objective.selection_metric,
        max_grad_norm=options.max_grad_norm,
        time_budget=options.time_budget,
    )
    scheduler = make_scheduler(
        optimizer, steps, options.warmup_steps, options.schedule, start_step=state.step,
        budget_spent=settings.budget_progress(state),
    )
    order = BatchOrder(run.objective.lengths(run.train_data), options.batch_size, options.seed)
    padding = order.padding(state.epoch)
    logger.info("training %d steps, batch %d x %d, padding %.1f%%", steps, options.batch_size,
                options.grad_accum, 100 * padding)
    run.model.eval()  # the frozen base runs without dropout; only the prompt learns
    trainable = Trainable(
        parameters,
        loss_sum=lambda batch: run.objective.loss_sum(
            run.frozen, run.model.prompt, run.train_data, batch, run.shared_prefix
        ),
        count=lambda batch: run.objective.count(run.train_data, batch),
    )
    hooks = _hooks(run, checkpoints, optimizer, metrics, average)
    try:
        loop = train_loop(
            trainable, order, optimizer, scheduler, settings, hooks, state, context, average
        )
    except TrainingDivergedError as error:
        raise TrainingDivergedError(
            f"{error} The best prompt so far is in {checkpoints.prompt_dir}. "
            f"Try a lower --lr (now {run.learning_rate:.4g})."
        ) from None
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d; state saved. Continue with: softprompt train "
                       "--resume %s", state.step, checkpoints.output_dir)
        raise
    return loop, padding


def _hooks(
    run: RunSetup,
    checkpoints: PromptCheckpoints,
    optimizer: torch.optim.Optimizer,
    metrics: MetricsLog | None,
    average: ParameterAverage | None,
) -> LoopHooks:
    """Validation on the validation split, the best prompt and resumable state (with the moving
    ``average`` where the run keeps one), metrics.jsonl."""
    return LoopHooks(
        validate=lambda: run.objective.evaluate(
            run.frozen, run.model.prompt, run.validation_data, context=run.evaluation_context
        ),
        keep_best=checkpoints.keep_best,
        save_state=lambda state: checkpoints.save_state(optimizer, state, average),
        log=metrics.write if metrics is not None else lambda record: None,
    )
