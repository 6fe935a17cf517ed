"""`PredictOptions`: the options of ``softprompt predict`` (classify a few texts with a prompt, or
generate from them with a generation prompt).

Torch-free, so that building the command line (and ``--help``) loads no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt.options import (
    DTYPE_HELP,
    DTYPES,
    choice_problems,
    positive_problems,
    raise_problems,
)


@dataclass
class PredictOptions:
    """Options of ``softprompt predict``: one prompt checkpoint, texts to classify or continue."""

    prompt: str = field(metadata={"help": "Prompt checkpoint directory"})
    texts: list[str] = field(
        metadata={"help": "Texts to classify (or to translate/continue)", "positional": True}
    )
    model: str | None = field(
        default=None, metadata={"help": "Base model (default: the checkpoint's, else smollm2-135m)"}
    )
    device: str = field(default="cpu", metadata={"help": "Torch device (cpu, cuda, cuda:1, mps)"})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    truncate: bool = field(
        default=False, metadata={"help": "Cut an over-long text to fit instead of failing"}
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Generation: most new tokens (default: the checkpoint's "
            "max_target_length, else 64)"
        },
    )
    json: bool = field(default=False, metadata={"help": "Print one JSON object per text"})

    def __post_init__(self) -> None:
        problems = choice_problems(self) + positive_problems(
            self, ("max_new_tokens",), optional=True
        )
        if isinstance(self.texts, str) or not self.texts:
            problems.append(f"texts must be a non-empty list of texts, got {self.texts!r}")
        raise_problems("predict options", problems)
