"""Run outputs people read: ``report.json``, ``metrics.jsonl`` (one line per logged step) and
``curves.png``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from softprompt.core.prefix import PrefixTunedModel
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.evaluation.figures import pyplot, save_figure
from softprompt.models.precision import DtypeChoice
from softprompt.training.loop import LoopResult
from softprompt.training.options import TrainOptions

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line, flushed at once so a crash loses nothing logged."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        if not append:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(
    metrics_path: str | Path, output: str | Path, title: str = "", metric: str = "accuracy"
) -> Path | None:
    """Training loss and the validation metric over steps, as a PNG (None without matplotlib).

    Args:
        metrics_path: the run's metrics.jsonl.
        output: the PNG to write (atomically).
        title: the figure's title.
        metric: the validation metric that selects the best prompt (``accuracy``; ``chrf`` for
            generation), plotted as ``validation_<metric>``.
    """
    plt = pyplot(output)
    if plt is None:
        return None
    records = MetricsLog(metrics_path, append=True).read()
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    key = f"validation_{metric}"
    validation = [(r["step"], r[key]) for r in records if key in r]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        loss_axis.plot(*zip(*losses, strict=True), color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    loss_axis.grid(alpha=0.3)
    if validation:
        accuracy_axis.plot(*zip(*validation, strict=True), marker="o", color="tab:green")
    accuracy_axis.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    accuracy_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, output)


def build_report(
    options: TrainOptions,
    model: PromptTunedModel | PrefixTunedModel,
    initial_prompt: torch.Tensor,
    loop: LoopResult,
    test: dict[str, Any],
    *,
    baselines: dict[str, float],
    train_examples: int,
    padding: float,
    seconds: tuple[float, float],
    device: torch.device,
    world_size: int,
    dtype: DtypeChoice,
    selection_metric: str = "accuracy",
    trained_parameters: int | None = None,
    learning_rate: float | None = None,
    verbalizer: dict[str, str] | None = None,
    label_words: dict[str, Any] | None = None,
    distillation: dict[str, Any] | None = None,
    class_weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The run's ``report.json``.

    Args:
        options: the run's options.
        model: the `PromptTunedModel` holding the prompt the test scored (the best one).
        initial_prompt: ``(n, hidden)`` prompt before training; the drift is measured from it.
        loop: where the training loop stopped and how many examples it trained on.
        test: the test split's metrics (``accuracy``, ``examples``, ...).
        baselines: ``zero_shot_accuracy``, ``init_accuracy`` and their ``*_macro_f1`` when
            measured.
        train_examples: examples in the (capped) train split.
        padding: fraction of pad tokens in the training batches.
        seconds: ``(wall, training)`` seconds.
        device: where the run ran.
        world_size: processes in the job.
        dtype: the frozen model's dtype and why (``dtype``, ``dtype_reason``, ``cpu_model``).
        selection_metric: the validation metric that picked the best prompt.
        trained_parameters: parameters the optimizer updated (the prompt, and a
            reparameterization's MLP, which is folded away before saving); default: the
            prompt's.
        learning_rate: the learning rate in effect (``lr_scale`` applied); default: the options'.
        verbalizer: label -> word of a classifier.
        label_words: the label-word search's choice (``--verbalizer auto``).
        distillation: the teachers, their weight and train accuracy (``--teacher``).
        class_weights: each label's loss weight (``--class-weights balanced``).
    """
    saved, total = model.get_nb_trainable_parameters()
    trainable = trained_parameters or saved
    saved_prompt = model.get_prompt_embedding_to_save()
    drift = model.get_prompt_embedding_to_save().cpu() - initial_prompt.cpu()
    wall_seconds, train_seconds = seconds
    state = loop.state
    return {
        "model": options.model,
        "dataset": options.dataset,
        "task_type": options.task_type,
        "num_virtual_tokens": options.num_virtual_tokens,
        "method": options.method,
        "init": str(options.init).upper(),
        "optimizer": options.optimizer,
        "lr": learning_rate or options.learning_rate,
        "lr_scale": options.lr_scale,
        "batch_size": options.batch_size,
        "reparameterize": options.reparameterize,
        "trainable_parameters": trainable,
        "total_parameters": total - saved + trainable,
        "saved_parameters": saved,
        "prompt_bytes": saved_prompt.numel() * saved_prompt.element_size(),
        "max_grad_norm": options.max_grad_norm,
        **({"ema_decay": options.ema_decay} if options.ema_decay else {}),
        "verbalizer": verbalizer,
        **({"label_words": label_words} if label_words else {}),
        **({"init_from": options.init_from} if options.init_from else {}),
        **(distillation or {}),
        **({"class_weights": class_weights} if class_weights else {}),
        "steps": state.step,
        "best_step": state.best_step,
        "train_examples": train_examples,
        "examples_seen": loop.examples_seen,
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "train_examples_per_second": loop.examples_seen / train_seconds if train_seconds else 0.0,
        "padding_fraction": padding,
        **baselines,
        "test_accuracy": test["accuracy"],
        **({"test_macro_f1": test["macro_f1"]} if "macro_f1" in test else {}),
        "test_examples": test["examples"],
        **{f"test_{name}": test[name] for name in ("chrf", "bleu") if name in test},
        "test_metrics": test,
        "selection_metric": selection_metric,
        # The best validation value of the selection metric (accuracy, or chrF for generation).
        f"best_validation_{selection_metric}": state.best_validation_accuracy,
        "prompt_drift_norm": float(drift.norm()),
        "prompt_drift_per_token": drift.norm(dim=1).tolist(),
        "device": str(device),
        **dtype.report_fields(),
        "world_size": world_size,
        "seed": options.seed,
    }


def training_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of the report a prompt's ``softprompt.json`` keeps under ``training``."""
    keys = (
        "steps",
        "best_step",
        "test_accuracy",
        "test_macro_f1",
        "best_validation_accuracy",
        "best_validation_macro_f1",
        "zero_shot_accuracy",
        "zero_shot_macro_f1",
        "init_accuracy",
        "init_macro_f1",
        "test_chrf",
        "test_bleu",
        "best_validation_chrf",
        "zero_shot_chrf",
        "init_chrf",
        "lr",
        "optimizer",
        "method",
        "trainable_parameters",
        "adapter_bytes",
    )
    return {key: report[key] for key in keys if key in report}
