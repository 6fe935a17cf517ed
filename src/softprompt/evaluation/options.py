"""`EvalOptions` and `InspectOptions`: the options of ``softprompt eval`` and ``inspect``.

Torch-free, so that building the command line (and ``--help``) loads no model code. The dataset
fields of :class:`EvalOptions` are those of ``softprompt train``; unset (None), they come from
the checkpoint's ``softprompt.json``, which records how its prompt was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from softprompt.options import (
    DTYPE_HELP,
    DTYPES,
    choice_problems,
    positive_problems,
    raise_problems,
)

TASK_KINDS = ("classification", "generation")
BASELINES = ("zero-shot", "few-shot")

_FROM_CHECKPOINT = " (default: the checkpoint's)"


@dataclass
class EvalOptions:
    """Options of ``softprompt eval``: a prompt checkpoint, or a baseline, scored on one split."""

    prompt: str | None = field(default=None, metadata={"help": "Prompt checkpoint directory"})
    model: str | None = field(
        default=None, metadata={"help": "Base model (default: the checkpoint's, else smollm2-135m)"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Dataset (default: the checkpoint's, else rotten_tomatoes)"}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Field holding the input text" + _FROM_CHECKPOINT}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Field holding the class label" + _FROM_CHECKPOINT}
    )
    target_column: str | None = field(
        default=None,
        metadata={"help": "Field holding the target text (generation)" + _FROM_CHECKPOINT},
    )
    direction: str | None = field(
        default=None,
        metadata={
            "help": "Translation direction of hsk_translation, en-zh or zh-en" + _FROM_CHECKPOINT
        },
    )
    task_type: str | None = field(
        default=None, metadata={"help": "Task kind" + _FROM_CHECKPOINT, "choices": TASK_KINDS}
    )
    template: str | None = field(
        default=None, metadata={"help": "Format string over record fields" + _FROM_CHECKPOINT}
    )
    verbalizer: str | None = field(
        default=None, metadata={"help": "JSON or label=word,label=word" + _FROM_CHECKPOINT}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Max tokens of a rendered input" + _FROM_CHECKPOINT}
    )
    max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens generated per example (generation)"
            + _FROM_CHECKPOINT
            + ", else 64"
        },
    )
    split: str = field(default="test", metadata={"help": "train, validation or test"})
    baseline: str | None = field(
        default=None, metadata={"help": "Evaluate without a soft prompt", "choices": BASELINES}
    )
    shots: int = field(default=4, metadata={"help": "In-context examples of the few-shot baseline"})
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "Instruction of the zero-/few-shot baselines (default: the dataset's, "
            "else one naming its labels)"
        },
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Zero-shot generation: put the instruction and text in the model's chat "
            "template (Qwen, SmolLM2 have one)"
        },
    )
    max_examples: int | None = field(default=None, metadata={"help": "Cap on scored examples"})
    batch_size: int = field(default=16, metadata={"help": "Examples per forward"})
    seed: int = field(default=0, metadata={"help": "Seed of the few-shot examples' choice"})
    device: str = field(default="cpu", metadata={"help": "Torch device (cpu, cuda, cuda:1, mps)"})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    output: str | None = field(
        default=None, metadata={"help": "JSON result path (default: <prompt>/../eval-<split>.json)"}
    )
    predictions: str | None = field(
        default=None,
        metadata={
            "help": "JSONL path for per-example predictions (gold and predicted label with "
            "probabilities; or reference and generated text)"
        },
    )
    json: bool = field(default=False, metadata={"help": "Print the result as JSON"})

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        problems += positive_problems(self, ("shots", "batch_size"))
        problems += positive_problems(
            self, ("max_examples", "max_length", "max_target_length"), optional=True
        )
        if self.chat_template and self.baseline != "zero-shot":
            problems.append(
                "chat_template applies to the zero-shot baseline only (--baseline zero-shot)"
            )
        for name in ("output", "predictions"):  # files: found out only after the evaluation
            if getattr(self, name) is not None and Path(getattr(self, name)).is_dir():
                problems.append(f"{name}={getattr(self, name)!r} is a directory; give a file path")
        raise_problems("eval options", problems)


@dataclass
class InspectOptions:
    """Options of ``softprompt inspect``: what a prompt checkpoint learned."""

    prompt_dir: str = field(metadata={"help": "Prompt checkpoint directory", "positional": True})
    model: str | None = field(
        default=None, metadata={"help": "Base model (default: the checkpoint's)"}
    )
    top_k: int = field(default=5, metadata={"help": "Nearest vocabulary tokens per virtual token"})
    json: bool = field(default=False, metadata={"help": "Print the result as JSON"})
    plot: str | None = field(
        default=None,
        metadata={"help": "Also draw the drift to this PNG: a bar per virtual token (a prefix: "
                  "a layer x token map of keys and values)", "metavar": "PNG"},
    )

    def __post_init__(self) -> None:
        problems = positive_problems(self, ("top_k",))
        if self.plot is not None and Path(self.plot).is_dir():  # else found out after the model
            problems.append(f"plot={self.plot!r} is a directory; give a PNG file path")
        raise_problems("inspect options", problems)


@dataclass
class SoupOptions:
    """Options of ``softprompt soup``: one prompt from the mean of several."""

    prompts: list[str] = field(
        metadata={"help": "Prompt checkpoint directories (one model, task and shape)",
                  "positional": True, "metavar": "DIR"},
    )
    output: str = field(metadata={"help": "Directory of the souped prompt"})
    greedy: bool = field(
        default=False,
        metadata={"help": "Add the prompts best-first, each kept only if the soup's score on "
                  "--split does not drop (default: the mean of all)"},
    )
    split: str = field(default="validation", metadata={"help": "Split that scores a greedy soup"})
    max_examples: int | None = field(default=None, metadata={"help": "Cap on scored examples"})
    batch_size: int = field(default=16, metadata={"help": "Examples per forward"})
    device: str = field(default="cpu", metadata={"help": "Torch device (cpu, cuda, cuda:1, mps)"})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    json: bool = field(default=False, metadata={"help": "Print the result as JSON"})

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        problems += positive_problems(self, ("batch_size",))
        problems += positive_problems(self, ("max_examples",), optional=True)
        if len(self.prompts) < 2:
            problems.append(f"a soup needs at least 2 prompts, got {len(self.prompts)}")
        if any(Path(prompt).resolve() == Path(self.output).resolve() for prompt in self.prompts):
            problems.append(f"output={self.output!r} is one of the prompts; the soup would replace it")
        raise_problems("soup options", problems)
