"""`train()`: the main job. One function is the Python API and the ``softprompt train`` command.

Flow: validate options and data (before the model loads) -> load the frozen model -> build the
prompt -> baselines (zero-shot, initial prompt) -> optimise the prompt on length-grouped
batches with periodic validation, best-checkpoint saving and early stopping -> test the best
prompt -> ``report.json``, ``metrics.jsonl``, ``curves.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt.core.checkpoint import atomic_write_json, load_prompt
from softprompt.core.config import PromptTuningConfig, TaskType
from softprompt.data import (
    DatasetSplits,
    Template,
    Verbalizer,
    default_template,
    length_grouped_batches,
    load_dataset,
    padding_fraction,
    parse_verbalizer,
)
from softprompt.core.prompt_model import PromptTunedModel, get_prompt_model
from softprompt.training import distributed
from softprompt.training.objectives import ClassificationObjective, GenerationObjective
from softprompt.training.optim import make_optimizer, make_scheduler
from softprompt.training.options import TrainOptions
from softprompt.training.report import MetricsLog, plot_curves
from softprompt.training.state import LoopState, load_state, save_state

logger = logging.getLogger(__name__)

PROMPT_DIR = "prompt"
OPTIONS_FILE = "options.json"
# Options a resumed run may set differently from the saved run (the rest define the run).
RESUME_CHANGEABLE = ("steps", "epochs", "eval_every", "patience", "baselines", "device", "dist_timeout")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its report."""

    output_dir: Path
    report: dict[str, Any]


@dataclass
class _Prepared:
    splits: DatasetSplits
    template: Template
    verbalizer: Verbalizer | None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps' but MPS is not available (use --device cpu or auto)")
    return torch.device(name)


def prepare(options: TrainOptions) -> _Prepared:
    """Check everything that needs no model, and report every problem in one error."""
    from softprompt.models import resolve_model_source

    problems = []
    try:
        resolve_model_source(options.model)
    except Exception as error:  # noqa: BLE001 - each problem is reported, none hidden
        problems.append(f"model={options.model!r}: {error}")
    splits = None
    try:
        splits = load_dataset(
            options.dataset,
            text_column=options.text_column,
            label_column=options.label_column if options.task_type == "classification" else None,
            target_column=options.target_column,
        )
    except Exception as error:  # noqa: BLE001
        problems.append(f"dataset={options.dataset!r}: {error}")
    template = None
    try:
        template = Template(options.template) if options.template else default_template(options.dataset, options.text_column)
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
            if not splits.labels:
                problems.append(f"dataset={options.dataset!r}: no labels in column {options.label_column!r}")
            else:
                try:
                    verbalizer = parse_verbalizer(options.verbalizer) if options.verbalizer else Verbalizer.default_for(splits.labels)
                    verbalizer.check_labels(splits.labels)
                except ValueError as error:
                    problems.append(f"verbalizer: {error}")
    if problems:
        raise ValueError("cannot start training:\n  - " + "\n  - ".join(problems))
    return _Prepared(splits, template, verbalizer)


def _default_output_dir(options: TrainOptions) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dataset = Path(options.dataset).stem if "/" in options.dataset or "." in options.dataset else options.dataset
    model = Path(options.model).stem if "/" in options.model else options.model
    return Path("runs") / f"{dataset}-{model}-{stamp}"


def train(options: TrainOptions | None = None, **overrides: Any) -> TrainResult:
    """Tune a soft prompt on a frozen model.

    Args:
        options: the run's options; or give them as keyword arguments (``num_virtual_tokens=20``).
        **overrides: options applied on top of ``options``.

    Returns:
        The output directory and the report (also in ``OUT/report.json``).

    Raises:
        ValueError: bad options or data, all problems listed at once, before the model loads.
        TrainingDivergedError: NaN/inf loss; the best checkpoint so far stays in ``OUT/prompt``.
    """
    # The options the caller set (the rest are defaults): on resume, only these override the saved run.
    given = set(overrides) | (set(getattr(options, "_given", ())) if options is not None else set())
    if options is None:
        options = TrainOptions(**overrides)
    elif overrides:
        options = TrainOptions.from_dict({**options.to_dict(), **overrides})
    if options.resume:
        options = _resumed_options(options, given)
    distributed.check_batch_divisible(options.batch_size, distributed.world_from_environment())
    prepared = prepare(options)
    device = resolve_device(options.device)
    context = distributed.init_distributed(device, options.dist_timeout)
    try:
        output_dir = Path(options.output_dir) if options.output_dir else _default_output_dir(options)
        output_dir = Path(distributed.broadcast_object(str(output_dir), context))
        if context.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(output_dir / OPTIONS_FILE, options.to_dict())
        distributed.barrier(context)
        return _Run(options, prepared, output_dir, device, context).execute()
    finally:
        distributed.shutdown(context)


def _resumed_options(options: TrainOptions, given: set[str]) -> TrainOptions:
    """The saved run's options, with the given ones that may change on resume (e.g. more steps).

    The prompt and optimizer state are saved whole, so the world size may change on resume too.
    Any other given option that differs from the saved run is an error rather than being ignored.
    """
    saved = json.loads((Path(options.resume) / OPTIONS_FILE).read_text())
    changed = {
        name: getattr(options, name) for name in sorted(given - {"resume", "output_dir", "preset"})
        if name in saved and getattr(options, name) != saved[name]
    }
    fixed = [name for name in changed if name not in RESUME_CHANGEABLE]
    if fixed:
        raise ValueError(
            f"resume={options.resume!r}: cannot change "
            + ", ".join(f"{name} (saved {saved[name]!r}, given {changed[name]!r})" for name in fixed)
            + f" when resuming; only {', '.join(RESUME_CHANGEABLE)} may change"
        )
    return TrainOptions.from_dict({**saved, **changed, "resume": options.resume, "output_dir": options.resume})


class _Run:
    """One training run's state; `execute` is the whole flow."""

    def __init__(
        self, options: TrainOptions, prepared: _Prepared, output_dir: Path, device: torch.device,
        context: distributed.DistContext,
    ) -> None:
        self.options = options
        self.prepared = prepared
        self.output_dir = output_dir
        self.device = device
        self.context = context
        self.metrics = MetricsLog(output_dir / "metrics.jsonl", append=bool(options.resume)) if context.is_main else None

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _save_prompt(self, metadata: dict[str, Any]) -> None:
        if self.context.is_main:  # rank 0 alone writes
            self.model.save_pretrained(self.output_dir / PROMPT_DIR, metadata)

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        from softprompt.models import load_model

        options = self.options
        started = time.perf_counter()
        device = f"cuda:{self.context.local_rank}" if self.device.type == "cuda" else str(self.device)
        base, self.tokenizer = load_model(options.model, task_type="CAUSAL_LM", dtype=options.dtype, device=device)
        logger.info("loaded %s in %.1f s", options.model, time.perf_counter() - started)
        prepared = self.prepared
        if options.task_type == "classification":
            self.verbalizer = prepared.verbalizer.tokenize(self.tokenizer)
            self.objective = ClassificationObjective(
                self.tokenizer, prepared.template, self.verbalizer, options.label_column, options.max_length
            )
        else:
            self.verbalizer = None
            self.objective = GenerationObjective(self.tokenizer, prepared.template, options.target_column, options.max_length)
        labels = None
        if prepared.verbalizer is not None:
            labels = [prepared.verbalizer.words(label)[0] for label in prepared.verbalizer.labels]
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=options.init,
            prompt_tuning_init_text=options.init_text,
            prompt_tuning_init_labels=labels,
            tokenizer_name_or_path=options.model,
            base_model_name_or_path=options.model,
            seed=options.seed,
        )
        self.model: PromptTunedModel = get_prompt_model(base, config, tokenizer=self.tokenizer)
        self.initial_prompt = self.model.get_prompt_embedding_to_save()
        self.shared_prefix = options.shared_prefix
        if options.shard_base:
            blocks = distributed.shard_frozen_base(base, self.context)
            # FSDP2 frees a frozen block's gathered weights after each call, so the backward of a
            # second call (the prompt-prefix pass) would find them gone: use one forward per batch.
            self.shared_prefix = False
            logger.info("sharded %d frozen decoder blocks over %d ranks", blocks, self.context.world_size)
        if isinstance(self.objective, ClassificationObjective):
            self.objective.shared_prefix = self.shared_prefix

    def _encode(self) -> None:
        options, splits = self.options, self.prepared.splits
        train_records = splits.train[: options.max_train_examples] if options.max_train_examples else splits.train
        cap = options.max_eval_examples
        self.train_data = self.objective.encode(train_records)
        validation_cap = min(filter(None, (cap, options.max_validation_examples)), default=None)
        validation = splits.validation[:validation_cap] if validation_cap else splits.validation
        self.validation_data = self.objective.encode(validation)
        self.test_records = splits.test[:cap] if cap else splits.test
        self.test_data = self.objective.encode(self.test_records)
        self.lengths = self.objective.lengths(self.train_data)
        logger.info(
            "examples: train %d, validation %d, test %d", len(self.train_data), len(self.validation_data), len(self.test_data)
        )

    def _metadata(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        prepared = self.prepared
        meta: dict[str, Any] = {
            "task": self.options.task_type,
            "template": prepared.template.format,
            "base_model": self.options.model,
            "dataset": self.options.dataset,
        }
        if prepared.verbalizer is not None:
            meta["verbalizer"] = {label: prepared.verbalizer.words(label)[0] for label in prepared.verbalizer.labels}
        meta["initial_prompt_norm"] = float(self.initial_prompt.norm())
        if summary:
            meta["training"] = summary
        return meta

    # ------------------------------------------------------------------ flow
    def execute(self) -> TrainResult:
        started = time.perf_counter()
        self._load()
        self._encode()
        options = self.options
        report: dict[str, Any] = {}
        if options.baselines and options.task_type == "classification" and not options.resume:
            zero_shot = self.objective.evaluate(
                self.model, self.objective.encode(self.test_records, context=options.init_text + "\n"),
                use_prompt=False, description="zero-shot", context=self.context,
            )
            report["zero_shot_accuracy"] = zero_shot["accuracy"]
            initial = self.objective.evaluate(self.model, self.test_data, description="initial prompt", context=self.context)
            report["init_accuracy"] = initial["accuracy"]
            logger.info("test accuracy: zero-shot %.4f, initial prompt %.4f", zero_shot["accuracy"], initial["accuracy"])
        train_started = time.perf_counter()
        loop, examples_seen = self._train()
        train_seconds = time.perf_counter() - train_started
        with torch.no_grad():
            self.model.prompt_encoder.embedding.weight.copy_(self.best_prompt.to(self.device))
        test = self.objective.evaluate(self.model, self.test_data, description="test", context=self.context)
        logger.info("test accuracy of the best prompt (step %d): %.4f", loop.best_step, test["accuracy"])
        trainable, total = self.model.get_nb_trainable_parameters()
        drift = self.model.get_prompt_embedding_to_save().cpu() - self.initial_prompt.cpu()
        report = {
            "model": options.model,
            "dataset": options.dataset,
            "task_type": options.task_type,
            "num_virtual_tokens": options.num_virtual_tokens,
            "init": str(options.init).upper(),
            "optimizer": options.optimizer,
            "lr": options.learning_rate,
            "batch_size": options.batch_size,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "steps": loop.step,
            "best_step": loop.best_step,
            "train_examples": len(self.train_data),
            "examples_seen": examples_seen,
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": train_seconds,
            "train_examples_per_second": examples_seen / train_seconds if train_seconds else 0.0,
            "padding_fraction": self.padding,
            **report,
            "test_accuracy": test["accuracy"],
            "test_examples": test["examples"],
            "test_metrics": test,
            "best_validation_accuracy": loop.best_validation_accuracy,
            "prompt_drift_norm": float(drift.norm()),
            "prompt_drift_per_token": drift.norm(dim=1).tolist(),
            "device": str(self.device),
            "world_size": self.context.world_size,
            "seed": options.seed,
        }
        if self.context.is_main:
            atomic_write_json(self.output_dir / "report.json", report)
            self._save_prompt(self._metadata(_summary(report)))
            plot_curves(self.metrics.path, self.output_dir / "curves.png", title=f"{options.dataset} / {options.model}")
            logger.info("wrote %s", self.output_dir)
        return TrainResult(self.output_dir, report)

    def _total_steps(self) -> int:
        options = self.options
        if options.steps is not None:
            return options.steps
        per_epoch = math.ceil(len(self.train_data) / (options.batch_size * options.grad_accum))
        return max(1, math.ceil(options.epochs * per_epoch))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.options.batch_size, seed=self.options.seed * 1000 + epoch)

    def _train(self) -> tuple[LoopState, int]:
        options = self.options
        total_steps = self._total_steps()
        prompt_parameter = self.model.prompt_encoder.embedding.weight
        optimizer = make_optimizer([prompt_parameter], options.optimizer, options.learning_rate, options.weight_decay)
        scheduler = make_scheduler(optimizer, total_steps, options.warmup_steps, options.schedule)
        loop = LoopState()
        if options.resume:
            prompt, loop = load_state(self.output_dir, optimizer, scheduler)
            with torch.no_grad():
                prompt_parameter.copy_(prompt.to(prompt_parameter.device))
            self.best_prompt = load_prompt(self.output_dir / PROMPT_DIR).weights
            logger.info("resumed %s at step %d", self.output_dir, loop.step)
        else:
            # The initial prompt is the first "best" so a run stopped at once still has a checkpoint.
            self.best_prompt = self.model.get_prompt_embedding_to_save().cpu()
            self._save_prompt(self._metadata())
        self.padding = padding_fraction(self.lengths, self._epoch_batches(loop.epoch))
        logger.info("training %d steps, batch %d x %d, padding %.1f%%", total_steps, options.batch_size,
                    options.grad_accum, 100 * self.padding)
        self.model.eval()  # the frozen base runs without dropout; only the prompt learns
        batches = self._epoch_batches(loop.epoch)
        examples_seen = 0
        window_examples, window_start = 0, time.perf_counter()
        step_start = None  # (step, epoch, batch_in_epoch) when the current step began
        progress = tqdm(total=total_steps, initial=loop.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.context.is_main)
        try:
            while loop.step < total_steps:
                step_start = (loop.step, loop.epoch, loop.batch_in_epoch)
                optimizer.zero_grad(set_to_none=True)
                step_batches = []
                for _ in range(options.grad_accum):
                    if loop.batch_in_epoch >= len(batches):
                        loop.epoch += 1
                        loop.batch_in_epoch = 0
                        batches = self._epoch_batches(loop.epoch)
                    step_batches.append(batches[loop.batch_in_epoch])
                    loop.batch_in_epoch += 1
                # Each rank backprops its shard's summed loss over the step's global count, so the
                # all-reduced gradient equals the single-process mean-loss gradient.
                total_count = sum(self.objective.count(self.train_data, batch) for batch in step_batches)
                loss_sum = torch.zeros((), dtype=torch.float64)
                for batch in step_batches:
                    shard = self.context.shard(batch)
                    if shard:  # an epoch's short last batch can leave a rank without examples
                        loss = self.objective.loss_sum(self.model, self.train_data, shard, self.shared_prefix)
                        (loss / total_count).backward()
                        loss_sum += loss.detach().double().cpu()
                    examples_seen += len(batch)
                    window_examples += len(batch)
                if prompt_parameter.grad is None:
                    prompt_parameter.grad = torch.zeros_like(prompt_parameter)
                if self.context.enabled:
                    distributed.all_reduce_sum(prompt_parameter.grad, self.context)
                    distributed.all_reduce_sum(loss_sum, self.context)
                step_loss = float(loss_sum) / total_count
                if not math.isfinite(step_loss):
                    raise TrainingDivergedError(
                        f"loss is {step_loss} at step {loop.step + 1}; stopped. The best prompt so far "
                        f"is in {self.output_dir / PROMPT_DIR}. Try a lower --lr (now {options.learning_rate})."
                    )
                optimizer.step()
                scheduler.step()
                loop.step += 1
                loop.window_loss += step_loss
                loop.window_steps += 1
                progress.update(1)
                elapsed = time.perf_counter() - window_start
                progress.set_postfix(loss=f"{step_loss:.4f}", ex_per_s=f"{window_examples / max(elapsed, 1e-9):.1f}")
                if loop.step % 10 == 0 or loop.step == total_steps:
                    self._log_metrics({
                        "step": loop.step, "loss": loop.window_loss / loop.window_steps,
                        "lr": scheduler.get_last_lr()[0], "examples_per_second": window_examples / max(elapsed, 1e-9),
                    })
                    loop.window_loss, loop.window_steps = 0.0, 0
                    window_examples, window_start = 0, time.perf_counter()
                evaluate_now = loop.step % options.eval_every == 0 or loop.step == total_steps
                if evaluate_now and self._evaluate(loop, optimizer, scheduler):
                    logger.info("early stop at step %d: no improvement in %d evaluations", loop.step, options.patience)
                    break
        except KeyboardInterrupt:
            if step_start is not None and loop.step == step_start[0]:
                # The step in progress did not finish: resume must redo it, so its batches are
                # handed back (its partial gradients are dropped by the next zero_grad).
                loop.epoch, loop.batch_in_epoch = step_start[1], step_start[2]
            if self.context.is_main:
                save_state(self.output_dir, prompt_parameter, optimizer, scheduler, loop)
            logger.warning("interrupted at step %d; state saved. Continue with: softprompt train --resume %s",
                           loop.step, self.output_dir)
            raise
        finally:
            progress.close()
        return loop, examples_seen

    def _evaluate(self, loop: LoopState, optimizer: torch.optim.Optimizer, scheduler: Any) -> bool:
        """Validate, keep the best prompt, save resumable state; True means stop early."""
        result = self.objective.evaluate(self.model, self.validation_data, context=self.context)
        accuracy = result["accuracy"]
        improved = accuracy > loop.best_validation_accuracy
        if improved:
            loop.best_validation_accuracy, loop.best_step = accuracy, loop.step
            loop.evals_without_improvement = 0
            self.best_prompt = self.model.get_prompt_embedding_to_save().cpu()
            self._save_prompt(self._metadata({"step": loop.step, "validation_accuracy": accuracy}))
        else:
            loop.evals_without_improvement += 1
        loop.history.append({"step": loop.step, "validation_accuracy": accuracy})
        self._log_metrics({"step": loop.step, "validation_accuracy": accuracy, "validation_loss": result["loss"]})
        logger.info("step %d: validation accuracy %.4f (best %.4f at step %d)", loop.step, accuracy,
                    loop.best_validation_accuracy, loop.best_step)
        if self.context.is_main:
            save_state(self.output_dir, self.model.prompt_encoder.embedding.weight, optimizer, scheduler, loop)
        patience = self.options.patience
        return patience is not None and loop.evals_without_improvement >= patience


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "best_step", "test_accuracy", "best_validation_accuracy", "zero_shot_accuracy", "init_accuracy", "lr", "optimizer")
    return {key: report[key] for key in keys if key in report}
