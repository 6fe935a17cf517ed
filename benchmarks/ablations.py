"""The paper's ablations on Rotten Tomatoes with SmolLM2-135M, resumable, with a report.

Groups (``--only``; default all):

* ``lengths``: prompt length 1, 5, 20, 50, 100 for every init (one curve per init);
* ``inits``: RANDOM, SAMPLE_VOCAB, TEXT, CLASS_LABEL at length 20;
* ``baselines``: zero-shot, few-shot K=4 and K=8 (in-context examples, no prompt) and prompt
  tuning (length 20, TEXT init);
* ``lora``: LoRA r=8 on q_proj/v_proj (PEFT) trained with the same verbalizer objective, data
  order, budget and scoring code as prompt tuning, against prompt tuning at length 20;
* ``stability``: every length and every init for both methods, plain prompts and deep prompts
  (``--method prefix``), to show where training diverges (a test accuracy below zero-shot).

Every config runs for a fixed budget of optimizer steps with each seed of ``--seeds``; the
accuracy is on the first ``--max-eval-examples`` test examples (validation is capped alike).
Each finished config is appended at once to ``benchmarks/results/ablations.jsonl``; a rerun skips
the configs already there (the key holds the config and every setting that changes its result).

    python benchmarks/ablations.py --only lengths --budget-steps 200 --seeds 0,1
    python benchmarks/ablations.py --report      # docs/results.md + plots from the JSONL
    python benchmarks/ablations.py --dry-run     # one tiny config per group, into a temp dir
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LENGTHS = (1, 5, 20, 50, 100)
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT", "CLASS_LABEL")
SHOTS = (4, 8)
METHODS = ("prompt", "prefix")  # softprompt train --method
GROUPS = ("lengths", "inits", "baselines", "lora", "stability")
DEFAULT_LENGTH, DEFAULT_INIT = 20, "TEXT"
LORA_RANK, LORA_TARGETS = 8, ("q_proj", "v_proj")
RESULTS = Path("benchmarks/results/ablations.jsonl")
REPORT = Path("docs/results.md")
PLOTS = Path("benchmarks/results")

logger = logging.getLogger("ablations")

# Settings that do not change a zero-/few-shot result, and settings that change no result.
_TRAINING_SETTINGS = ("budget_steps", "batch_size", "max_train_examples", "lr", "lora_lr", "eval_every",
                      "max_grad_norm", "schedule")
_NOT_IN_KEY = ("device", "length_inits", "grid_methods")
# Settings added after results were recorded, with the value those older records ran with: a
# setting at that value stays out of the key (old keys still match), and a record without the
# field reads as having it.
_LEGACY = {"max_grad_norm": 0.0, "dtype": "float32", "schedule": "constant"}


@dataclass(frozen=True)
class Settings:
    """What every config of one run shares (all of it is part of each result's key)."""

    model: str = "smollm2-135m"
    dataset: str = "rotten_tomatoes"
    budget_steps: int = 200
    batch_size: int = 8
    max_eval_examples: int = 400
    max_train_examples: int | None = None
    lr: float | None = None  # None: softprompt's default (AdamW 0.01)
    lora_lr: float = 1e-3
    eval_every: int | None = (
        None  # None: evaluate once, after the budget (the final state is tested)
    )
    max_grad_norm: float = 1.0  # softprompt train's default; 0 = no clipping (older records)
    schedule: str = "constant"  # the prompt runs' lr after warmup: constant, linear or cosine
    dtype: str = "auto"  # the frozen model's dtype in the prompt runs (LoRA's stays fp32)
    device: str = "auto"
    dry_run: bool = False
    length_inits: tuple[str, ...] = INITS  # the inits swept over LENGTHS (not part of a key)
    grid_methods: tuple[str, ...] = METHODS  # the stability grid's methods (not part of a key)


@dataclass(frozen=True)
class Config:
    """One ablation config (one seed)."""

    kind: str  # prompt_tuning, zero_shot, few_shot or lora
    seed: int
    num_virtual_tokens: int | None = None
    init: str | None = None
    shots: int | None = None
    rank: int | None = None
    method: str = "prompt"  # prompt_tuning only: prompt or prefix (deep prompts)
    groups: tuple[str, ...] = field(default=(), compare=False)

    def label(self) -> str:
        """A short description, e.g. ``prompt_tuning n=20 TEXT seed=0``."""
        details = {
            "prompt_tuning": f" {self.method} n={self.num_virtual_tokens} {self.init}",
            "few_shot": f" K={self.shots}",
            "lora": f" r={self.rank}",
        }
        return f"{self.kind}{details.get(self.kind, '')} seed={self.seed}"

    def key(self, settings: Settings) -> str:
        parts = [self.kind, f"seed{self.seed}"]
        if self.kind == "prompt_tuning":
            parts += [f"n{self.num_virtual_tokens}", self.init or ""]
            if self.method != "prompt":  # older records are all plain prompts
                parts.append(self.method)
        if self.kind == "few_shot":
            parts.append(f"k{self.shots}")
        if self.kind == "lora":
            parts.append(f"r{self.rank}")
        values = asdict(settings)
        if self.kind in ("zero_shot", "few_shot"):  # no training: training settings do not matter
            for name in _TRAINING_SETTINGS:
                values.pop(name)
        for name in _NOT_IN_KEY:
            values.pop(name)
        for name, legacy in _LEGACY.items():
            if values.get(name) == legacy:
                values.pop(name)
        return "|".join(parts + [f"{name}={values[name]}" for name in sorted(values)])


def configs_for(
    groups: Iterable[str],
    seeds: list[int],
    length_inits: Iterable[str] = INITS,
    grid_methods: Iterable[str] = METHODS,
) -> list[Config]:
    """Every config of the groups, each once (a config shared by groups runs once)."""
    found: dict[tuple, Config] = {}

    def add(config: Config, group: str) -> None:
        signature = (
            config.kind,
            config.seed,
            config.num_virtual_tokens,
            config.init,
            config.shots,
            config.rank,
            config.method,
        )
        old = found.get(signature)
        found[signature] = replace(config, groups=(*(old.groups if old else ()), group))

    for group in groups:
        for seed in seeds:
            reference = Config("prompt_tuning", seed, DEFAULT_LENGTH, DEFAULT_INIT)
            if group == "lengths":
                for init in length_inits:
                    for length in LENGTHS:
                        add(Config("prompt_tuning", seed, length, init), group)
            elif group == "inits":
                for init in INITS:
                    add(Config("prompt_tuning", seed, DEFAULT_LENGTH, init), group)
            elif group == "baselines":
                if seed == seeds[0]:  # zero-shot has nothing random
                    add(Config("zero_shot", seed), group)
                for shots in SHOTS:
                    add(Config("few_shot", seed, shots=shots), group)
                add(reference, group)
            elif group == "lora":
                add(Config("lora", seed, rank=LORA_RANK), group)
                add(reference, group)
            elif group == "stability":
                for method in grid_methods:
                    for init in INITS:
                        for length in LENGTHS:
                            add(Config("prompt_tuning", seed, length, init, method=method), group)
    return list(found.values())


# ----------------------------------------------------------------------------- runners
def run_prompt_tuning(config: Config, settings: Settings, runs_dir: Path) -> dict[str, Any]:
    from softprompt.training import train

    key = config.key(settings)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    name = (
        f"{config.method}-n{config.num_virtual_tokens}-{config.init}-seed{config.seed}-"
        f"{settings.budget_steps}steps"
    )
    output = runs_dir / f"{name}-{digest}"
    options = {
        "model": settings.model,
        "dataset": settings.dataset,
        "num_virtual_tokens": config.num_virtual_tokens,
        "init": config.init,
        "steps": settings.budget_steps,
        "batch_size": settings.batch_size,
        "eval_every": settings.eval_every or settings.budget_steps,
        "max_eval_examples": settings.max_eval_examples,
        "max_train_examples": settings.max_train_examples,
        "seed": config.seed,
        "baselines": False,
        "device": settings.device,
        "dtype": settings.dtype,
        "max_grad_norm": settings.max_grad_norm,
        "schedule": settings.schedule,
        "method": config.method,
        "output_dir": str(output),
        "overwrite": True,  # a config that died part-way runs again from the start
        "warmup_steps": min(10, settings.budget_steps - 1),
    }
    if settings.lr is not None:
        options["lr"] = settings.lr
    report = train(**options).report
    return {
        "test_accuracy": report["test_accuracy"],
        "validation_accuracy": report["best_validation_accuracy"],
        "trainable_parameters": report["trainable_parameters"],
        "train_seconds": report["train_seconds"],
        "effective_lr": report["lr"],
        "output_dir": str(output),
    }


def run_baseline(config: Config, settings: Settings) -> dict[str, Any]:
    from softprompt.evaluation.evaluate import evaluate_prompt

    device = "cpu" if settings.device == "auto" else settings.device
    result = evaluate_prompt(
        model=settings.model,
        dataset=settings.dataset,
        split="test",
        baseline="zero-shot" if config.kind == "zero_shot" else "few-shot",
        shots=config.shots or 4,
        max_examples=settings.max_eval_examples,
        seed=config.seed,
        device=device,
        dtype=settings.dtype,
    )
    return {
        "test_accuracy": result["accuracy"],
        "validation_accuracy": None,
        "trainable_parameters": 0,
        "train_seconds": 0.0,
    }


def run_lora(config: Config, settings: Settings) -> dict[str, Any]:
    """LoRA through PEFT, trained and scored exactly like a prompt, minus the prompt.

    The same objective (verbalizer cross-entropy, here with no prompt), batch order and training
    loop (`softprompt.training.loop.train_loop`) as ``softprompt train``; the adapters live in
    the model.
    """
    from softprompt.training.loop import LoopSettings
    from softprompt.training.setup import resolve_device

    frozen, parameters = trainable_model(
        settings.model, "lora", config.seed, str(resolve_device(settings.device)), "float32",
        config.rank,
    )
    cap = settings.max_eval_examples
    data = _lora_data(frozen.tokenizer, settings.dataset, settings.max_train_examples, cap, cap)
    steps = settings.budget_steps
    loop_settings = LoopSettings(steps, eval_every=settings.eval_every or steps,
                                 max_grad_norm=settings.max_grad_norm)
    outcome = train_weights(
        frozen, parameters, settings.lora_lr, data, settings.batch_size, config.seed,
        loop_settings, warmup_steps=min(10, steps - 1), schedule=settings.schedule,
    )
    return {**outcome, "effective_lr": settings.lora_lr}


def trainable_model(
    model: str, kind: str, seed: int, device: str, dtype: str, rank: int = LORA_RANK
) -> tuple[Any, list[Any]]:
    """The model as a `FrozenModel` (the prompts' interface) and the tensors that train.

    Args:
        model: the base model's name.
        kind: ``"lora"`` (LoRA r=``rank`` on q/v projections through PEFT; its matrices train,
            fp32 over any base dtype) or ``"full"`` (every weight trains).
        seed: seeds LoRA's random init.
        device: torch device.
        dtype: the base weights' dtype.
        rank: LoRA's rank.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from softprompt.fastpath.frozen import FrozenModel
    from softprompt.models import load_model

    base, tokenizer = load_model(model, dtype=dtype, device=device)
    torch.manual_seed(seed)
    if kind == "lora":
        lora_config = LoraConfig(
            task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS),
        )
        get_peft_model(base, lora_config)  # injects the LoRA layers into `base` itself
    frozen = FrozenModel(base.eval(), tokenizer)  # freezes every weight ...
    parameters = [p for name, p in base.named_parameters() if kind == "full" or "lora_" in name]
    for parameter in parameters:  # ... and these train
        parameter.requires_grad_(True)
    return frozen, parameters


def train_weights(
    frozen: Any,
    parameters: list[Any],
    lr: float,
    data: tuple[Any, tuple[Any, Any, Any]],
    batch_size: int,
    seed: int,
    loop_settings: Any,
    warmup_steps: int = 10,
    schedule: str = "constant",
    ema_decay: float = 0.0,
) -> dict[str, Any]:
    """Train model weights (LoRA's or all) with the prompts' objective, batch order and loop
    (AdamW, warmup then ``schedule``); the best validation state is tested.

    Args:
        frozen: the model (`trainable_model`).
        parameters: the tensors that train.
        lr: AdamW's learning rate.
        data: the objective and the encoded train, validation and test splits (`_lora_data`).
        batch_size: examples per step.
        seed: the batch order's seed.
        loop_settings: steps, validation interval, clipping, time budget (`LoopSettings`).
        warmup_steps: linear warmup steps.
        schedule: the learning rate after warmup: constant, linear or cosine decay.
        ema_decay: validate (and test) the moving average of the weights with this decay, as
            ``softprompt train --ema-decay`` does for prompts (0: the weights themselves).

    Returns:
        test accuracy and macro-F1, best validation accuracy, trainable parameters, steps,
        training wall seconds.
    """
    import torch

    from softprompt.training.averaging import ParameterAverage
    from softprompt.training.loop import BatchOrder, LoopHooks, Trainable, train_loop
    from softprompt.training.optim import make_optimizer, make_scheduler
    from softprompt.training.state import LoopState

    objective, (train_data, validation, test) = data
    optimizer = make_optimizer(parameters, "adamw", lr)
    state = LoopState()
    scheduler = make_scheduler(optimizer, loop_settings.total_steps, warmup_steps, schedule,
                               budget_spent=loop_settings.budget_progress(state))
    best: list[torch.Tensor] = []  # the trained tensors at the best validation

    def keep_best(_: Any) -> None:
        best[:] = [parameter.detach().clone() for parameter in parameters]

    trainable = Trainable(
        parameters,
        loss_sum=lambda batch: objective.loss_sum(frozen, None, train_data, batch),
        count=lambda batch: objective.count(train_data, batch),
    )
    hooks = LoopHooks(
        validate=lambda: objective.evaluate(frozen, None, validation), keep_best=keep_best
    )
    order = BatchOrder(objective.lengths(train_data), batch_size, seed)
    started = time.perf_counter()
    average = ParameterAverage(parameters, ema_decay) if ema_decay else None
    result = train_loop(trainable, order, optimizer, scheduler, loop_settings, hooks, state,
                        average=average)
    train_seconds = time.perf_counter() - started  # wall, validation included
    with torch.no_grad():
        for parameter, value in zip(parameters, best, strict=True):
            parameter.copy_(value)
    tested = objective.evaluate(frozen, None, test)
    return {
        "test_accuracy": tested["accuracy"],
        "test_macro_f1": tested.get("macro_f1"),
        "validation_accuracy": result.state.best_validation_accuracy,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "train_seconds": train_seconds,
        "steps": result.state.step,
    }


def _lora_data(
    tokenizer: Any,
    dataset: str,
    train_cap: int | None,
    validation_cap: int | None,
    test_cap: int | None,
    class_weights: str = "none",
) -> tuple[Any, tuple[Any, Any, Any]]:
    """The prompt runs' objective (default template and verbalizer) and encoded splits, each
    cut to its first ``*_cap`` examples (None: all); ``class_weights="balanced"`` weighs the loss
    by the train split's classes and selects by macro-F1, as ``softprompt train`` does."""
    from softprompt.data import Verbalizer, default_template, load_dataset
    from softprompt.training.objectives import ClassificationObjective
    from softprompt.training.options import TrainOptions

    splits = load_dataset(dataset)
    verbalizer = Verbalizer.default_for(splits.labels).tokenize(tokenizer)
    objective = ClassificationObjective(
        tokenizer, default_template(dataset), verbalizer, "label", TrainOptions.max_length
    )
    train = objective.encode(splits.train[:train_cap])
    if class_weights == "balanced":
        objective.balance_classes(train.targets)
    return objective, (
        train,
        objective.encode(splits.validation[:validation_cap]),
        objective.encode(splits.test[:test_cap]),
    )


def run_config(config: Config, settings: Settings, runs_dir: Path) -> dict[str, Any]:
    if config.kind == "prompt_tuning":
        return run_prompt_tuning(config, settings, runs_dir)
    if config.kind == "lora":
        return run_lora(config, settings)
    return run_baseline(config, settings)


# ----------------------------------------------------------------------------- results file
def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: not JSON, ignored (an interrupted write?)", path, number)
    return lines


def append_result(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def command_line(groups: Iterable[str], settings: Settings, seeds: list[int]) -> str:
    """The ``ablations.py`` command that runs these groups with these settings."""
    parts = [
        "python benchmarks/ablations.py",
        "--only",
        ",".join(groups),
        "--model",
        settings.model,
        "--budget-steps",
        str(settings.budget_steps),
        "--batch-size",
        str(settings.batch_size),
        "--seeds",
        ",".join(map(str, seeds)),
        "--max-eval-examples",
        str(settings.max_eval_examples),
    ]
    optional = (
        ("--max-train-examples", settings.max_train_examples),
        ("--lr", settings.lr),
        ("--eval-every", settings.eval_every),
    )
    parts += [f"{flag} {value}" for flag, value in optional if value is not None]
    for flag, name in (("--lora-lr", "lora_lr"), ("--max-grad-norm", "max_grad_norm"),
                       ("--schedule", "schedule"), ("--dtype", "dtype")):
        if getattr(settings, name) != getattr(Settings, name):
            parts.append(f"{flag} {getattr(settings, name)}")
    if "lengths" in groups and tuple(settings.length_inits) != INITS:
        parts.append(f"--length-inits {','.join(settings.length_inits)}")
    return " ".join(parts)


def run_all(
    groups: list[str],
    settings: Settings,
    seeds: list[int],
    results: Path,
    runs_dir: Path,
    limit: int | None = None,
) -> int:
    """Run every config not yet in ``results``; returns how many were due.

    Several runs may share ``results`` (say ``--only lengths`` and ``--only lora`` on two cores):
    a config that another run recorded meanwhile is skipped.
    """
    done = {record["key"] for record in read_results(results)}
    todo = [
        c
        for c in configs_for(groups, seeds, settings.length_inits, settings.grid_methods)
        if c.key(settings) not in done
    ]
    if limit is not None:
        todo = todo[:limit]
    logger.info("%d configs to run (%d already in %s)", len(todo), len(done), results)
    for index, config in enumerate(todo, 1):
        if config.key(settings) in {record["key"] for record in read_results(results)}:
            logger.info("[%d/%d] %s: recorded meanwhile by another run", index, len(todo), config.label())
            continue
        logger.info("[%d/%d] %s", index, len(todo), config.label())
        record = run_and_record(config, settings, seeds, results, runs_dir)
        logger.info("  test accuracy %.4f", record["test_accuracy"])
    return len(todo)


def run_and_record(
    config: Config, settings: Settings, seeds: list[int], results: Path, runs_dir: Path
) -> dict[str, Any]:
    """Run one config and append its record to ``results`` at once."""
    started = time.perf_counter()
    outcome = run_config(config, settings, runs_dir)
    record = {
        "key": config.key(settings),
        **asdict(config),
        "groups": list(config.groups),
        **asdict(settings),
        **outcome,
        "wall_seconds": time.perf_counter() - started,
        "command": command_line(config.groups, settings, seeds),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    append_result(results, record)
    return record


# ----------------------------------------------------------------------------- report
def _label(record: dict[str, Any]) -> tuple:
    """What a record measured, seeds aside: kind, length, init, shots, rank, method."""
    return (
        record["kind"],
        record.get("num_virtual_tokens"),
        record.get("init"),
        record.get("shots"),
        record.get("rank"),
        record.get("method", "prompt") if record["kind"] == "prompt_tuning" else None,
    )


def aggregate(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per config (seeds pooled): mean, sample std and range of test accuracy, params, seeds."""
    pooled: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        pooled.setdefault(_label(record), []).append(record)
    summary = {}
    for label, items in pooled.items():
        accuracies = [item["test_accuracy"] for item in items]
        summary[label] = {
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "min": min(accuracies),
            "max": max(accuracies),
            "seeds": sorted(item["seed"] for item in items),
            "trainable_parameters": items[0]["trainable_parameters"],
            "train_seconds": statistics.fmean(item["train_seconds"] for item in items),
            "command": items[0]["command"],
        }
    return summary


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} (n={len(entry['seeds'])})"


_ZERO_SHOT = ("zero_shot", None, None, None, None, None)


def length_tables(
    summary: dict[tuple, dict[str, Any]], zero_shot: dict[str, Any] | None
) -> list[str]:
    """Markdown: a length x init table per method found, and where training fell below zero-shot.

    Args:
        summary: ``aggregate`` of the records.
        zero_shot: the zero-shot entry: a config whose worst seed scores below it diverged.
    """
    lines = []
    for method in METHODS:
        rows = []
        for length in LENGTHS:
            entries = [summary.get(("prompt_tuning", length, init, None, None, method))
                       for init in INITS]
            if any(entries):
                params = next(e["trainable_parameters"] for e in entries if e)
                rows.append(f"| {length} | " + " | ".join(_cell(e) for e in entries)
                            + f" | {params:,} |")
        if not rows:
            continue
        entries = [e for label, e in summary.items()
                   if label[0] == "prompt_tuning" and label[5] == method]
        worst = min(entries, key=lambda e: e["min"])
        name = "deep prompts (`--method prefix`)" if method == "prefix" else "plain prompts"
        lines += [f"{name}:", "", "| length | " + " | ".join(INITS) + " | trainable params |",
                  "|---" * (len(INITS) + 2) + "|", *rows, ""]
        lowest = f"Lowest single run: {100 * worst['min']:.1f}% of {len(entries)} configs"
        if zero_shot is not None:
            below = sum(e["min"] < zero_shot["mean"] for e in entries)
            lowest += f"; {below} with a run below zero-shot ({100 * zero_shot['mean']:.1f}%)"
        lines += [lowest + ".", ""]
    return lines


def render_report(
    records: list[dict[str, Any]],
    settings: Settings,
    plots_dir: Path,
    report_dir: Path,
    results: Path = RESULTS,
) -> str:
    """docs/results.md: tables of mean ± std over seeds, reproduce commands, plot links."""
    summary = aggregate(records)
    seeds = sorted({record["seed"] for record in records}) or [0]
    test_count = settings.max_eval_examples
    lines = [
        "# Results: prompt-tuning ablations",
        "",
        f"Rotten Tomatoes (bundled splits), {settings.model}, a fixed budget of "
        f"{settings.budget_steps} optimizer steps of batch {settings.batch_size}; accuracy on the "
        f"first {test_count} test examples, "
        f"mean ± sample standard deviation over seeds (n = number of seeds), in percent. "
        f"Generated by `python benchmarks/ablations.py --report` from `{results}` "
        f"({len(records)} runs, last {max((r['finished_at'] for r in records), default='-')}).",
        "",
    ]
    if settings.dry_run:
        lines += ["**DRY RUN: 2-step smoke-test numbers, not results.**", ""]
    lines += [
        "## Prompt length and initialization",
        "",
        *length_tables(summary, zero_shot=summary.get(_ZERO_SHOT)),
        f"Reproduce: `{command_line(['lengths'], settings, seeds)}` "
        f"(the init table alone: `--only inits`; both methods: `--only stability`).",
        "",
        f"![accuracy vs prompt length]"
        f"({os.path.relpath(plots_dir / 'accuracy_vs_length.png', report_dir)})",
        "",
        "## Prompt tuning against zero-shot, few-shot and LoRA",
        "",
        "At this fixed step budget; every method on an equal time budget, with deep prompts, "
        "residual prompts and full fine-tuning, at three model sizes: [methods.md](methods.md).",
        "",
        "| method | trainable params | test accuracy |",
        "|---|---|---|",
    ]
    rows = [("zero-shot (instruction, no prompt)", _ZERO_SHOT)]
    rows += [
        (f"few-shot K={k} (in context, no prompt)", ("few_shot", None, None, k, None, None))
        for k in SHOTS
    ]
    rows += [
        (
            f"prompt tuning (n={DEFAULT_LENGTH}, {DEFAULT_INIT} init)",
            ("prompt_tuning", DEFAULT_LENGTH, DEFAULT_INIT, None, None, "prompt"),
        )
    ]
    rows += [
        (
            f"LoRA r={LORA_RANK} on {', '.join(LORA_TARGETS)} (PEFT)",
            ("lora", None, None, None, LORA_RANK, None),
        )
    ]
    for name, label in rows:
        entry = summary.get(label)
        if entry:
            lines.append(f"| {name} | {entry['trainable_parameters']:,} | {_cell(entry)} |")
    lines += [
        "",
        f"Reproduce: `{command_line(['baselines', 'lora'], settings, seeds)}`.",
        "",
        f"![accuracy vs trainable parameters]"
        f"({os.path.relpath(plots_dir / 'accuracy_vs_trainable_params.png', report_dir)})",
        "",
        "One config alone: `softprompt train --num-virtual-tokens N --init INIT --steps "
        f"{settings.budget_steps} --eval-every {settings.eval_every or settings.budget_steps} "
        f"--max-eval-examples {test_count} --seed S --no-baselines`, "
        "or `softprompt eval --baseline "
        f"few-shot --shots K --seed S --max-examples {test_count}`.",
        "",
    ]
    return "\n".join(lines)


def render_plots(records: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """accuracy_vs_length.png (one curve per init) and accuracy_vs_trainable_params.png."""
    plt = pyplot()
    if plt is None:
        return []
    summary = aggregate(records)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axes = plt.subplots(figsize=(6, 4))
    for init in INITS:
        points = [
            (n, summary[key])
            for n in LENGTHS
            if (key := ("prompt_tuning", n, init, None, None, "prompt")) in summary
        ]
        if points:
            _plot_points(axes, points, marker="o", label=init)
    axes.set(
        xscale="log",
        xlabel="prompt length (virtual tokens)",
        ylabel="test accuracy (%)",
        title="Prompt length and initialization",
    )
    axes.set_xticks(LENGTHS, [str(length) for length in LENGTHS])
    written.append(_finish_plot(plt, figure, axes, plots_dir / "accuracy_vs_length.png"))
    figure, axes = plt.subplots(figsize=(6, 4))
    tuned = [
        (e["trainable_parameters"], e)
        for label, e in summary.items()
        if label[0] == "prompt_tuning" and label[2] == DEFAULT_INIT and label[5] == "prompt"
    ]
    tuned.sort(key=lambda item: item[0])
    if tuned:
        _plot_points(axes, tuned, marker="o", label=f"prompt tuning ({DEFAULT_INIT} init)")
    lora = summary.get(("lora", None, None, None, LORA_RANK, None))
    if lora:
        _plot_points(
            axes,
            [(lora["trainable_parameters"], lora)],
            marker="s",
            linestyle="none",
            label=f"LoRA r={LORA_RANK}",
        )
    for label, entry in summary.items():
        if label[0] in ("zero_shot", "few_shot"):
            name = "zero-shot" if label[0] == "zero_shot" else f"few-shot K={label[3]}"
            axes.axhline(100 * entry["mean"], linestyle="--", linewidth=1, color="gray")
            axes.text(
                0.01,
                100 * entry["mean"],
                name,
                fontsize=8,
                va="bottom",
                transform=axes.get_yaxis_transform(),
            )
    axes.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="test accuracy (%)",
        title="Accuracy against trainable parameters",
    )
    path = plots_dir / "accuracy_vs_trainable_params.png"
    written.append(_finish_plot(plt, figure, axes, path))
    return written


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (logged) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install softprompt[plot]); no plots")
        return None
    return plt


def _plot_points(axes: Any, points: list[tuple[float, dict[str, Any]]], **style: Any) -> None:
    """Mean test accuracy (%) with a std error bar at each ``(x, aggregate entry)``."""
    axes.errorbar(
        [x for x, _ in points],
        [100 * entry["mean"] for _, entry in points],
        yerr=[100 * entry["std"] for _, entry in points],
        capsize=3,
        **style,
    )


def _finish_plot(plt: Any, figure: Any, axes: Any, path: Path) -> Path:
    """Legend (when anything is labelled), layout, save as PNG, close; returns ``path``."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def matching(records: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """The records measured under ``settings`` (zero-/few-shot: whatever the training settings)."""
    keep = {name: value for name, value in asdict(settings).items() if name not in _NOT_IN_KEY}
    return [
        r
        for r in records
        if all(
            r.get(name, _LEGACY.get(name)) == value
            for name, value in keep.items()
            if not (r["kind"] in ("zero_shot", "few_shot") and name in _TRAINING_SETTINGS)
        )
    ]


def report(results: Path, settings: Settings, report_path: Path, plots_dir: Path) -> Path:
    """Render the report and plots from the records that match ``settings``.

    The same grid run under other values of the settings added later (``_LEGACY``: clipping,
    schedule, dtype) follows in a section per variant, so the effect of each stays visible.
    """
    every = read_results(results)
    records = matching(every, settings)
    if not records:
        raise SystemExit(
            f"{results}: no results for these settings ({command_line(GROUPS, settings, [0])})"
        )
    render_plots(records, plots_dir)
    text = render_report(records, settings, plots_dir, report_path.parent, results)
    variants = {
        replace(settings, **{name: r.get(name, legacy) for name, legacy in _LEGACY.items()})
        for r in every if r["kind"] == "prompt_tuning"
    }
    for variant in sorted(variants - {settings}, key=lambda v: [str(getattr(v, n)) for n in _LEGACY]):
        older = matching(every, variant)
        if not any(record["kind"] == "prompt_tuning" for record in older):
            continue
        summary = aggregate(older)
        described = ", ".join(f"{name} {getattr(variant, name)}" for name in _LEGACY)
        text += "\n" + "\n".join([
            f"## The grid with {described}",
            "",
            *length_tables(summary, zero_shot=summary.get(_ZERO_SHOT)),
            f"Reproduce: `{command_line(['stability'], variant, sorted({r['seed'] for r in older}))}`.",
            "",
        ])
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text, encoding="utf-8")
    return report_path



# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated groups: {', '.join(GROUPS)}"
    )
    parser.add_argument("--model", default=Settings.model)
    parser.add_argument(
        "--budget-steps", type=int, default=Settings.budget_steps, dest="budget_steps"
    )
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, dest="batch_size")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (>= 2 for a spread)")
    parser.add_argument(
        "--max-eval-examples",
        type=int,
        default=Settings.max_eval_examples,
        dest="max_eval_examples",
    )
    parser.add_argument("--max-train-examples", type=int, dest="max_train_examples")
    parser.add_argument(
        "--lr", type=float, help="prompt-tuning lr (default: softprompt's, AdamW 0.01)"
    )
    parser.add_argument("--lora-lr", type=float, default=Settings.lora_lr, dest="lora_lr")
    parser.add_argument(
        "--eval-every",
        type=int,
        dest="eval_every",
        help="validate every N steps and test the best state (default: once, at the end)",
    )
    parser.add_argument(
        "--length-inits",
        default=",".join(INITS),
        dest="length_inits",
        help="comma-separated inits swept over the prompt lengths (default: all)",
    )
    parser.add_argument(
        "--grid-methods",
        default=",".join(METHODS),
        dest="grid_methods",
        help="comma-separated methods of the stability grid (default: both; two processes can "
        "share the results file, one per method)",
    )
    parser.add_argument("--max-grad-norm", type=float, default=Settings.max_grad_norm,
                        dest="max_grad_norm", help="gradient clipping (0: none, as before 1.0 "
                        "became the default)")
    parser.add_argument("--schedule", default=Settings.schedule,
                        choices=("constant", "linear", "cosine"),
                        help="the learning-rate decay after warmup (prompts and LoRA)")
    parser.add_argument("--dtype", default=Settings.dtype,
                        help="the frozen model's dtype in the prompt runs (float32: as before)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"JSONL file (default {RESULTS})"
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablations"), dest="runs_dir")
    parser.add_argument("--limit", type=int, help="run at most this many configs now")
    parser.add_argument(
        "--report", action="store_true", help="render docs/results.md and the plots, run nothing"
    )
    parser.add_argument("--report-path", type=Path, default=REPORT, dest="report_path")
    parser.add_argument("--plots-dir", type=Path, default=PLOTS, dest="plots_dir")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        dest="dry_run",
        help="one config per group, 2 steps on a few examples, into a temp dir; then a report",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    groups = [group.strip() for group in args.only.split(",") if group.strip()]
    unknown = [group for group in groups if group not in GROUPS]
    if unknown or not groups:
        raise SystemExit(f"--only: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    settings = Settings(
        model=args.model,
        budget_steps=args.budget_steps,
        batch_size=args.batch_size,
        max_eval_examples=args.max_eval_examples,
        max_train_examples=args.max_train_examples,
        lr=args.lr,
        lora_lr=args.lora_lr,
        eval_every=args.eval_every,
        max_grad_norm=args.max_grad_norm,
        schedule=args.schedule,
        dtype=args.dtype,
        device=args.device,
        length_inits=tuple(init.strip().upper() for init in args.length_inits.split(",")),
        grid_methods=tuple(method.strip() for method in args.grid_methods.split(",")),
    )
    if unknown := [method for method in settings.grid_methods if method not in METHODS]:
        raise SystemExit(f"--grid-methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if unknown := [init for init in settings.length_inits if init not in INITS]:
        raise SystemExit(f"--length-inits: unknown init(s) {unknown}; choose from {', '.join(INITS)}")
    if args.dry_run:
        return dry_run(groups, settings)
    if args.report:
        print(f"wrote {report(args.results, settings, args.report_path, args.plots_dir)}")
        return 0
    run_all(groups, settings, seeds, args.results, args.runs_dir, args.limit)
    return 0


def dry_run(groups: list[str], settings: Settings) -> int:
    """One config per group, 2 steps, 16 training and 8 evaluation examples, all in a temp dir."""
    settings = replace(
        settings,
        budget_steps=2,
        batch_size=4,
        max_train_examples=16,
        max_eval_examples=8,
        eval_every=None,
        dry_run=True,
    )
    with tempfile.TemporaryDirectory(prefix="ablations-dry-run-") as directory:
        root = Path(directory)
        results = root / "ablations.jsonl"
        picked = {}  # the first config of each group; the stability grid's last is a deep prompt
        for group in groups:
            configs = configs_for([group], [0], settings.length_inits, settings.grid_methods)
            for config in (configs[0], configs[-1]) if group == "stability" else configs[:1]:
                picked[config.key(settings)] = config
        for config in picked.values():
            run_and_record(config, settings, [0], results, root / "runs")
        path = report(results, settings, root / "results.md", root / "plots")
        print(path.read_text(encoding="utf-8"))
        for record in read_results(results):
            print(
                f"dry run ok: {record['kind']:<14} test accuracy {record['test_accuracy']:.3f} "
                f"({record['trainable_parameters']:,} trainable params, "
                f"{record['wall_seconds']:.0f} s)"
            )
        print("plots:", ", ".join(sorted(p.name for p in (root / "plots").glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
