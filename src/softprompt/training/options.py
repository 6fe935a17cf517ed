"""`TrainOptions`: every knob of ``softprompt train``, validated together before any model loads.

Torch-free, so that building the command line (and ``--help``) loads no model code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.core.config import PromptTuningInit
from softprompt.evaluation.options import TASK_KINDS
from softprompt.options import (
    DTYPE_HELP,
    DTYPES,
    choice_problems,
    positive_problems,
    raise_problems,
)

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
INITS = tuple(item.value for item in PromptTuningInit)
REPARAMETERIZATIONS = ("none", "residual")  # core.reparameterize
LR_SCALES = ("none", "embedding")  # optim.scaled_learning_rate
# Every run writes its options here first, so the file marks a directory that holds a run.
OPTIONS_FILE = "options.json"
AUTO_VERBALIZER = "auto"  # label words chosen from the train split (evaluation.label_words)
CLASS_WEIGHTS = ("none", "balanced")  # objectives.balanced_class_weights
METHODS = ("prompt", "prefix")

# Named option sets, applied by `TrainOptions.from_preset` (``softprompt train --preset``).
# "demo" is `make demo`: the best recipe measured to fit 10 minutes on 2 CPU cores, a deep prompt,
# 300 steps x 16 with a cosine decay, validating and keeping the moving average of the prompt,
# scored on every test example, against zero-shot only (SmolLM2-135M, AMD EPYC, seeds 0-4:
# 86.57 +- 0.29%; without the average 86.03 +- 0.64%; README, Results). "full" is the long run
# of a plain prompt: 50 tokens, about 0.8 epoch with a cosine decay (86.2% in 67 minutes on one
# CPU core).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "method": "prefix",
        "batch_size": 16,
        "steps": 300,
        "eval_every": 100,
        "max_eval_examples": None,
        "max_validation_examples": 500,
        "ema_decay": 0.99,
        "init_baseline": False,
    },
    "full": {
        "num_virtual_tokens": 50,
        "steps": 500,
        "batch_size": 16,
        "eval_every": 100,
        "max_eval_examples": None,
        "max_validation_examples": 500,
        "schedule": "cosine",
        "warmup_steps": 30,
    },
    "quick": {"steps": 6, "eval_every": 3, "max_eval_examples": 16, "batch_size": 4},
    # English -> Chinese on the bundled HSK pairs (--direction zh-en for the reverse); the init
    # text is the direction's instruction, the targets are scored by chrF and BLEU.
    "translation": {
        "dataset": "hsk_translation",
        "task_type": "generation",
        "num_virtual_tokens": 12,
        "max_validation_examples": 100,
        "max_eval_examples": 200,
    },
    # The seed's tweet recipe: 3 imbalanced classes (report.json adds macro-F1); the init text
    # is the dataset's instruction, "Classify if the text is positive, neutral or negative:"
    # (data.templates.DEFAULT_INSTRUCTIONS). 600 steps, scored on every test example: 150 steps
    # scored 11 points less macro-F1 (SmolLM2-135M, AMD EPYC; README, Results).
    "tweets": {
        "dataset": "tweet_sentiment",
        "num_virtual_tokens": 10,
        "verbalizer": "positive=positive,neutral=neutral,negative=negative",
        "steps": 600,
        "eval_every": 150,
        "max_eval_examples": None,
    },
}


def _recipe(path: Path) -> dict[str, Any]:
    """The options an earlier run saved in ``path`` (its ``options.json``), less where it wrote."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"preset {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"preset {str(path)!r} is not a readable JSON file: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"preset {str(path)!r} must hold a JSON object of options, "
                         f"got {type(values).__name__}")
    unknown = sorted(set(values) - {item.name for item in dataclasses.fields(TrainOptions)})
    if unknown:
        raise ValueError(f"preset {str(path)!r} names options this version does not have: "
                         f"{', '.join(unknown)}")
    hints = typing.get_type_hints(TrainOptions)
    wrong = [f"{key}={value!r}" for key, value in values.items() if not _fits(value, hints[key])]
    if wrong:
        raise ValueError(f"preset {str(path)!r} gives options a value of the wrong type: "
                         f"{', '.join(wrong)}")
    # Where and how the earlier run was written is not part of its recipe.
    return {key: value for key, value in values.items()
            if key not in ("output_dir", "resume", "overwrite")}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` is of the type ``hint`` (an int is a float; a bool is no number)."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(entry, item) for entry in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass
class TrainOptions:
    """Options of a prompt-tuning run; named as the CLI flags (``--num-virtual-tokens``)."""

    model: str = field(
        default="smollm2-135m", metadata={"help": "Bundled name, local folder, .gguf or Hub id"}
    )
    dataset: str = field(
        default="rotten_tomatoes",
        metadata={"help": "Bundled name, .jsonl/.csv/.tsv, folder, or HF name"},
    )
    text_column: str = field(default="text", metadata={"help": "Field holding the input text"})
    label_column: str = field(default="label", metadata={"help": "Field holding the class label"})
    target_column: str | None = field(
        default=None,
        metadata={"help": "Field holding the target text (generation; hsk_translation: target)"},
    )
    direction: str | None = field(
        default=None,
        metadata={"help": "Translation direction of hsk_translation: en-zh (default) or zh-en"},
    )
    task_type: str = field(
        default="classification",
        metadata={"help": "classification (verbalizer) or generation", "choices": TASK_KINDS},
    )
    template: str | None = field(
        default=None, metadata={"help": "Format string over record fields"}
    )
    verbalizer: str | None = field(
        default=None,
        metadata={"help": "JSON, label=word,label=word, or auto (words chosen from the train split)"},
    )
    num_virtual_tokens: int = field(default=20, metadata={"help": "Length of the soft prompt"})
    init: str = field(default="TEXT", metadata={"help": "Prompt init (any case)", "choices": INITS})
    init_text: str | None = field(
        default=None,
        metadata={
            "help": "Instruction for TEXT init and the zero-shot baseline (default: the "
            "dataset's, else one naming its labels)"
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start from this saved prompt directory (same method and length) "
                  "instead of --init", "metavar": "DIR"},
    )
    teacher: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompt directory to distil from; repeat the flag for an ensemble, whose "
            "mean label probabilities over the train split become soft targets",
            "metavar": "DIR",
        },
    )
    distill_weight: float = field(
        default=0.5,
        metadata={"help": "With --teacher: the loss is this x cross-entropy to the teachers' "
                  "probabilities + (1 - this) x cross-entropy to the gold labels"},
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "balanced: weigh each class's loss by n / (classes x its train count), so a "
            "minority class counts as much as a majority one; the best prompt is then the one "
            "with the best validation macro-F1 (classification)",
            "choices": CLASS_WEIGHTS,
        },
    )
    reparameterize: str = field(
        default="none",
        metadata={
            "help": "residual: train the prompt through a shared MLP with a skip connection "
            "(saved folded, a plain prompt)",
            "choices": REPARAMETERIZATIONS,
        },
    )
    residual_bottleneck: int = field(
        default=128, metadata={"help": "Inner size of the residual reparameterization's MLP"}
    )
    method: str = field(
        default="prompt",
        metadata={"help": "prompt: input embeddings; prefix: keys/values at every layer", "choices": METHODS},
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "Train a prefix through an MLP (folded away on save)"}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the prefix MLP (default: its token_dim)"}
    )
    optimizer: str = field(
        default="adamw", metadata={"help": "adafactor is the paper's", "choices": OPTIMIZERS}
    )
    lr: float | None = field(
        default=None, metadata={"help": "Learning rate (default: per optimizer; 1e-4 with prefix_projection)"}
    )
    lr_scale: str = field(
        default="none",
        metadata={
            "help": "embedding: multiply lr by the model's embedding std / SmolLM2-135M's (0.135), "
            "so the default carries over (Gemma-3-270M: x7.6)",
            "choices": LR_SCALES,
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay on the prompt"})
    # Cosine by the stability sweep (docs/results.md): with a constant rate the last state of a
    # 50-token prompt collapsed to one label (58-60% test) even with clipping; decayed, every
    # length trained, and the demo run scored 87.25% against 86.5% (400 test examples).
    schedule: str = field(
        default="cosine",
        metadata={"help": "Learning-rate decay after warmup, to 0 at the last step", "choices": SCHEDULES},
    )
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the gradient's global norm to this (0: no clipping)"}
    )
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Keep an exponential moving average of the trained tensors with this "
                  "decay (warmed up: min(decay, (1+step)/(10+step))); validation, the best "
                  "prompt and the test use the average (0: off; e.g. 0.99)"},
    )
    steps: int | None = field(default=150, metadata={"help": "Optimizer steps (overrides epochs)"})
    epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs over the train split (given without steps, they set the length)"},
    )
    time_budget: float | None = field(
        default=None,
        metadata={"help": "Stop after this many seconds of training steps (validation not "
                  "counted); the last step validates, and the schedule's decay ends there"},
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per forward"})
    grad_accum: int = field(default=1, metadata={"help": "Forwards per optimizer step"})
    eval_every: int = field(default=50, metadata={"help": "Steps between validation evaluations"})
    patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evals without improvement"}
    )
    max_eval_examples: int | None = field(
        default=400, metadata={"help": "Cap on test examples (and on validation)"}
    )
    max_validation_examples: int | None = field(
        default=200, metadata={"help": "Cap on validation examples scored at each evaluation"}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on train examples"})
    max_length: int = field(default=256, metadata={"help": "Max tokens of a rendered input"})
    max_target_length: int = field(
        default=64, metadata={"help": "Max tokens of a generation target (longer is an error)"}
    )
    seed: int = field(default=0, metadata={"help": "Seed of init, data order and sampling"})
    device: str = field(
        default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": DEVICES}
    )
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    output_dir: str | None = field(
        default=None, metadata={"help": "Default runs/<dataset>-<model>-<time>"}
    )
    resume: str | None = field(default=None, metadata={"help": "Run directory to continue"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Train into an --output-dir that already holds a run, replacing its "
                  "prompt, state and report (without it, such a directory is refused)"},
    )
    baselines: bool = field(
        default=True, metadata={"help": "Also evaluate zero-shot and the initial prompt"}
    )
    init_baseline: bool = field(
        default=True,
        metadata={"help": "With --baselines, also evaluate the initial prompt (before any step); "
                  "--no-init-baseline keeps zero-shot alone"},
    )
    shared_prefix: bool = field(
        default=True,
        metadata={"help": "Compute the prompt once per batch, and in evaluation the tokens every "
                  "example starts with once per split (fast path)"},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the frozen model: the first steps compile for minutes, "
                  "so it pays over thousands of steps (falls back to eager if it fails)"},
    )
    shard_base: bool = field(
        default=False,
        metadata={"help": "Shard the frozen decoder blocks across torchrun ranks (FSDP2)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each frozen block's activations in the backward pass "
                  "instead of keeping them: less memory for long inputs or large batches, "
                  "about one more forward per step"},
    )
    dist_timeout: float = field(
        default=600.0, metadata={"help": "Seconds a distributed collective may wait"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.init, str):  # any case on input; stored as the enum's value
            self.init = self.init.upper()
        raise_problems("training options", self.problems())

    @classmethod
    def from_preset(cls, preset: str | None, **given: Any) -> TrainOptions:
        """Options of a preset, with every ``given`` option winning.

        A preset is a name in ``PRESETS`` or the ``options.json`` an earlier run wrote (a
        committed ``prompts/<name>/`` keeps its run's): its recipe, less its ``output_dir``,
        ``resume`` and ``overwrite``, so the rerun writes a new run directory. A given option
        wins even when it equals the default the preset would replace
        (``from_preset("quick", batch_size=8)`` keeps 8). ``preset=None`` is ``cls(**given)``.

        Raises:
            ValueError: an unknown name; a file that is missing, not JSON, not an object, or
                that names options this version does not have (each named, with the file).
        """
        if preset is None:
            return cls(**given)
        if preset in PRESETS:
            return cls(**{**PRESETS[preset], **given})
        if not str(preset).endswith(".json") and not Path(preset).is_file():
            raise ValueError(
                f"preset={preset!r} is not valid; allowed: {', '.join(PRESETS)}, "
                "or the options.json of an earlier run"
            )
        return cls(**{**_recipe(Path(preset)), **given})

    def problems(self) -> list[str]:
        """Every problem with these options (checks that need no data or model)."""
        problems = choice_problems(self)
        problems += positive_problems(
            self,
            (
                "num_virtual_tokens",
                "batch_size",
                "grad_accum",
                "eval_every",
                "max_length",
                "max_target_length",
                "residual_bottleneck",
            ),
        )
        problems += positive_problems(
            self,
            (
                "patience",
                "max_eval_examples",
                "max_validation_examples",
                "max_train_examples",
                "steps",
            ),
            optional=True,
        )
        if self.steps is None and (self.epochs is None or self.epochs <= 0):
            problems.append("set steps, or epochs > 0")
        if self.time_budget is not None and not self.time_budget > 0:
            problems.append(f"time_budget must be > 0 seconds or unset, got {self.time_budget}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            problems.append(f"lr must be > 0 and finite, got {self.lr}")
        if not self.max_grad_norm >= 0:
            problems.append(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1) (0: no moving average), got {self.ema_decay}")
        if self.teacher and self.task_type != "classification":
            problems.append("teacher needs task_type='classification' (label probabilities)")
        if not 0 <= self.distill_weight <= 1:
            problems.append(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.class_weights != "none" and self.task_type != "classification":
            problems.append(f"class_weights={self.class_weights!r} needs task_type='classification'")
        if self.verbalizer == AUTO_VERBALIZER and self.task_type != "classification":
            problems.append("verbalizer='auto' needs task_type='classification'")
        if self.init == "TEXT" and self.init_text is not None and not self.init_text.strip():
            problems.append("init='TEXT' needs init_text")
        problems += self._prefix_problems()
        if self.output_dir is not None and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            problems.append(f"output_dir={self.output_dir!r} is a file, not a directory")
        elif (self.output_dir is not None and self.resume is None and not self.overwrite
              and (Path(self.output_dir) / OPTIONS_FILE).is_file()):
            problems.append(
                f"output_dir={self.output_dir!r} already holds a run; continue it with "
                f"--resume {self.output_dir}, replace it with --overwrite, or choose another "
                "--output-dir"
            )
        if self.resume is not None and not (Path(self.resume) / "state").is_dir():
            problems.append(
                f"resume={self.resume!r}: no resumable run there "
                f"(missing {Path(self.resume) / 'state'})"
            )
        return problems

    def _prefix_problems(self) -> list[str]:
        """Options a deep prompt (``method='prefix'``) cannot be combined with."""
        if self.method != "prefix":
            return ["prefix_projection needs method='prefix'"] if self.prefix_projection else []
        problems = []
        if not self.prompt_prefix_shared:
            problems.append("method='prefix' is keys/values: it needs shared_prefix, and not "
                            "shard_base")
        if self.reparameterize == "residual":
            problems.append(
                "reparameterize='residual' is for input prompts; a prefix trains through its own "
                "MLP with prefix_projection"
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            problems.append(f"encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
        return problems

    @property
    def prompt_prefix_shared(self) -> bool:
        """Whether training computes the prompt's keys/values once per batch (the fast path).
        Not with ``shard_base`` (FSDP2 frees a block's gathered weights after each call, so the
        backward of the prefix pass would find them gone): then one forward of ``[prompt, text]``
        per batch."""
        return self.shared_prefix and not self.shard_base

    @property
    def learning_rate(self) -> float:
        """The learning rate in effect: Adafactor 0.3 (the paper), AdamW 0.01 (README, Results);
        1e-4 for a prefix trained through its MLP, whose last layer moves every key/value at once
        (SmolLM2, 20 steps: 86% test at 1e-4, 61% at 1e-3, 59% at 1e-2)."""
        if self.lr is not None:
            return self.lr
        if self.prefix_projection:
            return 1e-4
        return 0.3 if self.optimizer == "adafactor" else 0.01

    def non_defaults(self) -> set[str]:
        """Names of the options whose value differs from their default: those a caller set."""
        return {
            item.name
            for item in dataclasses.fields(self)
            if getattr(self, item.name)
            != (item.default_factory() if item.default is dataclasses.MISSING else item.default)
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOptions:
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})
